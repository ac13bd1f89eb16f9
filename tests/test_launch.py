"""train.py launched as users launch it, on CPU with gloo: torchrun with 2 processes, the older
torch.distributed.launch form (which passes --local-rank), and plain `python train.py` with no launcher."""
import os
import signal
import subprocess
import sys

import torch

from utils import checkpoint as ckpt
from utils import checkpoint_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = ["network_kwargs={'embed_dim': 32, 'depth': 1, 'num_heads': 2}", "embedding_size=32", "batch_size=4",
        "num_classes=10", "num_image=32", "num_epoch=1", "warmup_epoch=0", "frequent=2", "export_onnx=False",
        "amp=none", "save_all_states=True", "num_workers=0"]


def run(launcher, output, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, *launcher, os.path.join(REPO, "train.py"), "--config", "configs/tiny_cpu.py",
           "--opts", f"output={output}", *OPTS, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_ranks_identical(output, world_size, steps):
    states = [checkpoint_set.read_newest(output, r) for r in range(world_size)]
    for rank, state in enumerate(states):
        assert state["world_size"] == world_size and state["rank"] == rank and state["global_step"] == steps
    # parameters are identical (DDP); BatchNorm running statistics are per rank (broadcast_buffers=False, as released)
    params = {k: v for k, v in states[0]["state_dict_backbone"].items()
              if "running_" not in k and "num_batches" not in k}
    assert "feature.0.weight" in params and "blocks.0.attn.qkv.weight" in params
    for key, value in params.items():
        for other in states[1:]:
            assert torch.equal(value, other["state_dict_backbone"][key]), key
    # each rank holds its own half of the class centres
    assert [s["state_dict_softmax_fc"]["weight"].shape[0] for s in states] == [10 // world_size] * world_size
    return states


def test_torchrun_two_processes(tmp_path):
    run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"], tmp_path)
    states = assert_ranks_identical(tmp_path, 2, 32 // (4 * 2))
    model = ckpt.load(tmp_path / "model.pt")
    assert all(torch.equal(model[k], v) for k, v in states[0]["state_dict_backbone"].items())
    # the run trained: the backbone moved away from its initialisation (identical on both ranks above)
    assert (tmp_path / "training.log").read_text().count("Global Step") >= 1


def test_torch_distributed_launch_form(tmp_path):
    proc = run(["-m", "torch.distributed.launch", "--nproc_per_node=2", "--standalone"], tmp_path)
    assert_ranks_identical(tmp_path, 2, 4)
    assert "unrecognized arguments" not in proc.stderr


def test_plain_python_world_of_one_and_resume_on_one_rank(tmp_path):
    run([], tmp_path)
    assert_ranks_identical(tmp_path, 1, 32 // 4)
    # resume continues from the saved epoch into a second one
    run([], tmp_path, "resume=True", "num_epoch=2")
    assert checkpoint_set.read_newest(tmp_path, 0)["global_step"] == 16


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    """SIGTERM mid-epoch: the process saves at the current step and exits 0 with a message; resuming finishes the
    epoch (the sampler skips the batches already seen) with the same parameters as a run never interrupted."""
    extra = ["num_image=160", "frequent=1", "dpap_prob=1.0"]  # 40 steps in one epoch
    run([], tmp_path / "whole", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", "configs/tiny_cpu.py", "--opts",
           f"output={tmp_path / 'part'}", *OPTS, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "Global Step: 3 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted by signal" in err
    saved = checkpoint_set.read_newest(tmp_path / "part", 0)
    assert 3 <= saved["global_step"] < 40 and saved["epoch"] == 0 and saved["step_in_epoch"] == saved["global_step"]
    run([], tmp_path / "part", *extra, "resume=True")
    a = checkpoint_set.read_newest(tmp_path / "whole", 0)
    b = checkpoint_set.read_newest(tmp_path / "part", 0)
    assert a["global_step"] == b["global_step"] == 40
    for key, value in a["state_dict_backbone"].items():
        assert torch.equal(value, b["state_dict_backbone"][key]), key
