"""The release README's training line, its training.log layout and resuming its checkpoints, through train.py."""
import os
import shlex

import pytest
import torch

import train
from lr_scheduler import PolyScheduler
from tests.release_format import release_schedule, write_release_checkpoints
from tests.test_release_logs import CONFIG, PREFIX, REQUIRED, SPEED
from utils.resume import load_resume
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils import release_checkpoint as rc
from utils.distributed import DistEnv
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY = '{"embed_dim": 16, "depth": 1, "num_heads": 2}'
# The release README's training line, word for word.
README_TRAIN = ('python -m torch.distributed.launch --nproc_per_node=8 --nnodes=1 --node_rank=0 '
                '--master_addr="127.0.0.1" --master_port=12581 train.py ')


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(output, *opts):
    base = [f"output={output}", f"network_kwargs={TINY}", "embedding_size=16", "batch_size=8", "num_classes=10",
            "num_image=32", "num_epoch=2", "warmup_epoch=1", "frequent=2", "export_onnx=False", "amp=none",
            "seed=5", "lr=0.01", "weight_decay=0.1", "optimizer=adamw"]
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), base + list(opts))


def test_readme_training_line_trains_the_release_default_config(monkeypatch):
    words = shlex.split(README_TRAIN)
    script_args = words[words.index("train.py") + 1:]
    assert script_args == []
    seen = {}

    def fake_train(cfg, env, stop=None):
        seen["cfg"] = cfg
        return {"status": "finished", "global_step": 0}

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.chdir(REPO)
    for launcher_arg in ("--local-rank=0", "--local_rank=0"):  # what new / old torch.distributed.launch append
        assert train.main(script_args + [launcher_arg]) == 0
        cfg = seen.pop("cfg")
        assert os.path.basename(cfg.config_file) == "glint360k_vit_s.py"
        assert (cfg.network, cfg.num_classes, cfg.batch_size) == ("vit_s_dp005_mask_0", 360232, 128)
    # arcface_torch's habit: the config as a positional argument
    assert train.main(["configs/tiny_cpu.py"]) == 0
    assert os.path.basename(seen.pop("cfg").config_file) == "tiny_cpu.py"


def messages(output):
    lines = open(os.path.join(output, "training.log")).read().splitlines()
    matched = [PREFIX.match(line) for line in lines]
    assert all(matched), [line for line, m in zip(lines, matched) if not m]
    return [m.group(2) for m in matched]


def test_training_log_reads_like_the_release(tmp_path):
    cfg = tiny_cfg(tmp_path, "num_epoch=2", "frequent=2")
    assert train.train(cfg, CPU) == {"status": "finished", "global_step": 8}
    lines = messages(tmp_path)
    dump = [line for line in lines if line.startswith(": ")]
    parsed = dict(CONFIG.match(line).groups() for line in dump if not line.startswith(": interclass"))
    assert dump[0] == ": " + next(iter(cfg)) + " " * (25 - len(next(iter(cfg)))) + str(cfg[next(iter(cfg))])
    assert parsed["network"] == "vit_t" and parsed["batch_size"] == "8"
    # the derived lines, last, as the release computes them: 32 // 8 = 4 steps per epoch
    assert dump[-3:] == [": total_batch_size         8", ": warmup_step              4", ": total_step               8"]
    speed = [SPEED.search(line) for line in lines if line.startswith("Speed ")]
    # the first logging step only starts the clock: steps 4, 6, 8 are logged
    assert [(int(m.group(4)), int(m.group(5))) for m in speed] == [(0, 4), (1, 6), (1, 8)]
    assert all(REQUIRED.search(line) for line in lines if line.startswith("Speed "))
    assert all(float(m.group(2)) > 0 and float(m.group(1)) > 0 for m in speed)
    # and the plotting tool reads the same numbers
    from tools.plot_training import read_log
    run = read_log(os.path.join(tmp_path, "training.log"))
    assert run["loss"] == ([4, 6, 8], [float(m.group(2)) for m in speed])


class NaNAtStep(train.PartialFC):
    """Loss NaN at the `bad`-th call with grad (counting from 1)."""
    calls, bad = 0, 2

    def forward(self, embeddings, labels, sample_weights=None):
        loss = super().forward(embeddings, labels, sample_weights)
        if torch.is_grad_enabled():
            NaNAtStep.calls += 1
            if NaNAtStep.calls == NaNAtStep.bad:
                return loss * float("nan")
        return loss


def test_resume_a_release_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_cfg(out)
    (release,) = write_release_checkpoints(cfg, 1, epoch=1, global_step=4)

    # nothing left to train: the saved backbone comes back unchanged
    assert train.train(tiny_cfg(out, "resume=True", "num_epoch=1", "warmup_epoch=0"), CPU) == {"status": "finished",
                                                                           "global_step": 4}
    model = ckpt.load(out / "model.pt")
    assert all(torch.equal(model[k], v) for k, v in release["state_dict_backbone"].items())
    log = "\n".join(messages(out))
    assert rc.resume_note(rc.from_release(release, 1)) in log
    assert "resumed at epoch 1, step 0 of the epoch, global step 4" in log

    # one more epoch, with a non-finite step on the way: our fused optimiser skips it on the device
    NaNAtStep.calls = 0
    monkeypatch.setattr(train, "PartialFC", NaNAtStep)
    for name in os.listdir(out):
        if name != "checkpoint_gpu_0.pt" and os.path.isfile(out / name):
            os.remove(out / name)
    cfg = tiny_cfg(out, "resume=True", "save_all_states=True")
    assert train.train(cfg, CPU) == {"status": "finished", "global_step": 8}
    saved = checkpoint_set.read_newest(out, 0)
    assert saved["world_size"] == 1 and saved["epoch"] == 2 and saved["global_step"] == 8
    groups = saved["state_optimizer"]["param_groups"]
    assert all(g["fused"] is True for g in groups)
    # Adam's step count continued from the release's 4, minus the skipped step
    assert {float(s["step"]) for s in saved["state_optimizer"]["state"].values()} == {4 + 4 - 1}
    # the release's LR counter continued (it was 3 after 4 iterations), and the LR is the release formula's
    warmup_step, total_step = release_schedule(cfg, 1)
    assert saved["state_lr_scheduler"]["last_epoch"] == 3 + 4
    assert (saved["state_lr_scheduler"]["max_steps"], saved["state_lr_scheduler"]["warmup_steps"]) == (
        total_step, warmup_step)
    assert groups[0]["lr"] == pytest.approx(0.01 * (1 - (7 - warmup_step) / (total_step - warmup_step)) ** 2)
    assert "non-finite loss in 1 of the last" in "\n".join(messages(out))


def test_resume_a_release_checkpoint_on_another_world_size(tmp_path):
    cfg = tiny_cfg(tmp_path, "num_classes=11")
    release = write_release_checkpoints(cfg, 2, epoch=1, global_step=2)  # 2 ranks: 32 // 16 = 2 steps per epoch
    saved = load_resume(tiny_cfg(tmp_path, "num_classes=11", "resume=True"), CPU,
                              train.init_logging(0, str(tmp_path)))
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["world_size"]) == (1, 0, 2, 2)
    full = torch.cat([r["state_dict_softmax_fc"]["weight"] for r in release])
    assert torch.equal(saved["state_dict_softmax_fc"]["weight"], full)
    head = saved["state_optimizer"]["param_groups"][1]["params"][0]
    assert torch.equal(saved["state_optimizer"]["state"][head]["exp_avg"],
                       torch.cat([r["state_optimizer"]["state"][head]["exp_avg"] for r in release]))
    log = "\n".join(messages(tmp_path))
    assert "checkpoint written by 2 ranks, running on 1: re-partitioning the Partial FC shards" in log
    # and the whole run continues on one rank: epoch 1 has 4 steps here
    cfg = tiny_cfg(tmp_path, "num_classes=11", "resume=True", "save_all_states=True")
    assert train.train(cfg, CPU) == {"status": "finished", "global_step": 6}
    assert checkpoint_set.read_newest(tmp_path, 0)["world_size"] == 1


def test_release_scheduler_keys_map_onto_ours():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours = set(PolyScheduler(optimizer, 0.1, 10, 2).state_dict())
    assert set(rc.SCHEDULER_KEYS) | {"_is_initial"} == ours
