"""train.py in-process on CPU (a world of one, no process group): learning, the dpap/ehsm switches, exact resume,
non-finite handling and re-partitioning of the Partial FC shards for a new world size."""
import os

import pytest
import torch

import train
from utils import checkpoint as ckpt
from utils.distributed import DistEnv
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.1}'
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite on the shared machine
    yield
    torch.set_num_threads(threads)


def tiny_cfg(output, *opts):
    base = [f"output={output}", f"network_kwargs={TINY}", "embedding_size=32", "batch_size=8", "num_classes=10",
            "num_image=32", "num_epoch=2", "warmup_epoch=0", "frequent=2", "export_onnx=False", "amp=none",
            "seed=7"]
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), base + list(opts))


class RecordingPartialFC(train.PartialFC):
    """Records every loss and whether EHSM weights were passed."""
    losses, weighted = [], []

    def forward(self, embeddings, labels, sample_weights=None):
        loss = super().forward(embeddings, labels, sample_weights)
        if torch.is_grad_enabled():
            RecordingPartialFC.losses.append(loss.item())
            RecordingPartialFC.weighted.append(sample_weights)
        return loss


@pytest.fixture
def recording(monkeypatch):
    RecordingPartialFC.losses, RecordingPartialFC.weighted = [], []
    monkeypatch.setattr(train, "PartialFC", RecordingPartialFC)
    return RecordingPartialFC


def test_loss_falls_and_outputs_written(tmp_path, recording):
    cfg = tiny_cfg(tmp_path, "num_image=160", "num_epoch=2", "lr=0.03", "export_onnx=True")  # 20 steps/epoch
    result = train.train(cfg, CPU)
    assert result == {"status": "finished", "global_step": 40}
    losses = recording.losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.4 * first, (first, last)
    state = ckpt.load(tmp_path / "model.pt")
    assert "patch_embed.proj.weight" in state and not any(k.startswith("module.") for k in state)
    assert (tmp_path / "training.log").exists() and (tmp_path / "tensorboard").is_dir()
    assert (tmp_path / "model.onnx").exists()


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(train, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, name, wrapper)
    return calls


@pytest.mark.parametrize("use_dpap,use_ehsm", [(True, True), (False, True), (True, False), (False, False)])
def test_dpap_and_ehsm_switches(tmp_path, monkeypatch, recording, use_dpap, use_ehsm):
    dpap_calls = count_calls(monkeypatch, "dpap")
    ehsm_calls = count_calls(monkeypatch, "ehsm_weights")
    forwards = []
    original_get_model = train.get_model

    def get_model(*args, **kwargs):
        model = original_get_model(*args, **kwargs)
        model.register_forward_hook(lambda m, i, o: forwards.append(torch.is_grad_enabled()))
        return model

    monkeypatch.setattr(train, "get_model", get_model)
    cfg = tiny_cfg(tmp_path, f"dpap={use_dpap}", f"ehsm={use_ehsm}", "num_epoch=1")
    train.train(cfg, CPU)
    steps = 4
    assert len(dpap_calls) == (steps if use_dpap else 0)
    assert len(ehsm_calls) == (steps if use_ehsm else 0)
    # dpap on: one no-grad forward before each forward with grad; off: the first forward is skipped entirely
    assert forwards == ([False, True] if use_dpap else [True]) * steps
    assert all((w is not None) == use_ehsm for w in recording.weighted)
    if use_ehsm:
        assert all(w.shape == (8,) and bool((w > 1).all()) and bool((w < 2).all()) for w in recording.weighted)


def final_state(output):
    return ckpt.load(os.path.join(output, "checkpoint_gpu_0.pt"))


@pytest.mark.parametrize("stop_at,opts", [(3, ["optimizer=adamw"]), (4, ["optimizer=sgd", "lr=0.01"]),
                                          (2, ["gradient_acc=2", "num_image=64"])])
def test_resume_equals_uninterrupted(tmp_path, stop_at, opts):
    common = ["save_all_states=True", "dpap_prob=1.0", "sample_rate=0.5", *opts]
    whole = tiny_cfg(tmp_path / "whole", *common)
    assert train.train(whole, CPU)["status"] == "finished"
    part = tiny_cfg(tmp_path / "part", *common)
    assert train.train(part, CPU, stop=lambda step: step == stop_at) == {"status": "preempted",
                                                                           "global_step": stop_at}
    assert final_state(part.output)["global_step"] == stop_at
    resumed = tiny_cfg(tmp_path / "part", *common, "resume=True")
    assert train.train(resumed, CPU)["status"] == "finished"
    a, b = final_state(whole.output), final_state(part.output)
    assert a["global_step"] == b["global_step"] == 8
    for key in a["state_dict_backbone"]:
        assert torch.equal(a["state_dict_backbone"][key], b["state_dict_backbone"][key]), key
    assert torch.equal(a["state_dict_softmax_fc"]["weight"], b["state_dict_softmax_fc"]["weight"])
    assert a["state_lr_scheduler"]["last_epoch"] == b["state_lr_scheduler"]["last_epoch"] == 8


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    class NaNAfterFour(train.PartialFC):
        calls = 0

        def forward(self, *args, **kwargs):
            loss = super().forward(*args, **kwargs)
            NaNAfterFour.calls += 1
            return loss * float("nan") if NaNAfterFour.calls > 4 else loss  # epoch 0 is clean

    monkeypatch.setattr(train, "PartialFC", NaNAfterFour)
    cfg = tiny_cfg(tmp_path, "save_all_states=True", "dpap=False", "max_nonfinite_steps=3")
    result = train.train(cfg, CPU)
    assert result == {"status": "nonfinite", "global_step": 7}
    saved = final_state(tmp_path)
    assert saved["epoch"] == 1 and saved["global_step"] == 4  # the epoch-0 checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in saved["state_dict_backbone"].values() if v.is_floating_point())
    model = ckpt.load(tmp_path / "model.pt")  # skipped updates left the weights finite
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_repartition_for_new_world_size(tmp_path):
    """Shards written by 2 ranks are merged and cut for 1 and 3 ranks; optimiser moments follow the centres."""
    cfg = tiny_cfg(tmp_path, "num_classes=11")
    full, moment = torch.randn(11, 32), torch.randn(11, 32)
    for rank, (start, stop) in enumerate([(0, 6), (6, 11)]):
        ckpt.atomic_save({"world_size": 2, "step_in_epoch": 2, "state_dict_softmax_fc": {"weight": full[start:stop]},
                          "state_optimizer": {"state": {5: {"exp_avg": moment[start:stop], "step": torch.tensor(3.)}},
                                              "param_groups": [{"params": [0, 1, 2, 3, 4]}, {"params": [5]}]}},
                         ckpt.checkpoint_path(tmp_path, rank))
    for world, expected in [(1, [(0, 11)]), (3, [(0, 4), (4, 8), (8, 11)])]:
        for rank, (start, stop) in enumerate(expected):
            env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
            out = train.repartition_states(cfg, env, final_state(tmp_path))
            assert torch.equal(out["state_dict_softmax_fc"]["weight"], full[start:stop])
            assert torch.equal(out["state_optimizer"]["state"][5]["exp_avg"], moment[start:stop])
            assert out["step_in_epoch"] == 2 * 2 // world  # same number of samples seen


def test_repartition_needs_every_old_checkpoint(tmp_path):
    """A missing or stale checkpoint of the previous world size is a clear error naming the file."""
    cfg = tiny_cfg(tmp_path, "num_classes=11")
    for rank, (start, stop) in enumerate([(0, 6), (6, 11)]):
        ckpt.atomic_save({"world_size": 2, "global_step": 8, "step_in_epoch": 2,
                          "state_dict_softmax_fc": {"weight": torch.zeros(stop - start, 32)},
                          "state_optimizer": {"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}},
                         ckpt.checkpoint_path(tmp_path, rank))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    stale = final_state(tmp_path)
    stale["global_step"] = 4
    ckpt.atomic_save(stale, ckpt.checkpoint_path(tmp_path, 0))
    with pytest.raises(RuntimeError, match=r"checkpoint_gpu_0\.pt was written by a run of 2 rank\(s\) at global "
                                           r"step 4, but this resume needs the checkpoints of 2 rank\(s\) at global "
                                           r"step 8"):
        train.repartition_states(cfg, env, ckpt.load(ckpt.checkpoint_path(tmp_path, 1)))
    os.remove(ckpt.checkpoint_path(tmp_path, 1))
    with pytest.raises(FileNotFoundError, match=r"checkpoint_gpu_1\.pt is missing\. The previous run used 2 ranks "
                                                r"and all of its checkpoint files \(checkpoint_gpu_0\.pt \.\. "
                                                r"checkpoint_gpu_1\.pt\) are needed in the output folder"):
        train.repartition_states(cfg, env, final_state(tmp_path))


def test_stale_checkpoint_temp_files_removed_at_startup(tmp_path):
    """Temp files left by a process killed mid-save are deleted when training starts: rank 0 removes those of its
    own checkpoint and of model.pt, nothing else (other ranks' temp files, other names, other suffixes)."""
    stale = ["checkpoint_gpu_0.pt.tmp.4242", "checkpoint_gpu_0.pt.tmp.1", "model.pt.tmp.77"]
    kept = ["checkpoint_gpu_1.pt.tmp.4242", "checkpoint_gpu_0.pt.tmp.x1", "checkpoint_gpu_0.pt.tmp.",
            "checkpoint_gpu_10.pt.tmp.5", "mycheckpoint_gpu_0.pt.tmp.5", "model.pt.tmp.77.bak", "notes.tmp.3"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert sorted(ckpt.remove_stale_temp_files(str(tmp_path / "missing"), ["model.pt"])) == []
    result = train.train(tiny_cfg(tmp_path, "num_epoch=1"), CPU)
    assert result == {"status": "finished", "global_step": 4}
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp" in n) == sorted(kept)
    log = (tmp_path / "training.log").read_text()
    assert all(f"removed {tmp_path / name}, left by a save that was interrupted" in log for name in stale)
    # the helper on its own: exactly the given names, any pid
    removed = ckpt.remove_stale_temp_files(str(tmp_path), ["checkpoint_gpu_1.pt", "checkpoint_gpu_10.pt"])
    assert removed == [str(tmp_path / "checkpoint_gpu_1.pt.tmp.4242"), str(tmp_path / "checkpoint_gpu_10.pt.tmp.5")]


def test_fp16_on_cpu_falls_back_to_bf16(tmp_path, recording):
    import logging

    assert train.resolve_amp(tiny_cfg(tmp_path, "amp=fp16"), torch.device("cpu"), logging.getLogger("t")) == (
        torch.bfloat16, False)
    assert train.resolve_amp(tiny_cfg(tmp_path, "amp=none"), torch.device("cpu"), logging.getLogger("t")) == (
        None, False)
    result = train.train(tiny_cfg(tmp_path, "amp=fp16", "num_epoch=1"), CPU)
    assert result == {"status": "finished", "global_step": 4}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recording.losses)


def test_onnx_export_skipped_without_onnx(tmp_path, monkeypatch):
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    messages = []
    logger = logging.getLogger("onnx-test")
    monkeypatch.setattr(logger, "warning", messages.append)
    cfg = tiny_cfg(tmp_path)
    train.export_onnx(cfg, train.get_model("vit_t", num_features=32, embed_dim=32, depth=1, num_heads=2), logger)
    assert len(messages) == 1 and "ONNX export skipped" in messages[0]
    assert not (tmp_path / "model.onnx").exists()
