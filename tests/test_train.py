"""train.py in-process on CPU (a world of one, no process group): learning, the dpap/ehsm switches, exact resume,
non-finite handling and re-partitioning of the Partial FC shards for a new world size."""
import os

import pytest
import torch

import train
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils import resume
from utils.distributed import DistEnv
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.1}'
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


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
    return checkpoint_set.read_newest(output, 0)


@pytest.mark.parametrize("stop_at,opts", [(3, ["optimizer=adamw"]), (4, ["optimizer=sgd", "lr=0.01"]),
                                          (2, ["gradient_acc=2", "num_image=64"]), (3, ["loss=adaface"])])
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
    assert list(a["state_dict_softmax_fc"]) == list(b["state_dict_softmax_fc"])
    for key in a["state_dict_softmax_fc"]:  # the centres; with AdaFace also its running norm statistics
        assert torch.equal(a["state_dict_softmax_fc"][key], b["state_dict_softmax_fc"][key]), key
    if "loss=adaface" in opts:
        assert a["state_dict_softmax_fc"]["margin_loss.running_mean"] != 20.0  # moved from its initial value
    assert a["state_lr_scheduler"]["last_epoch"] == b["state_lr_scheduler"]["last_epoch"] == 8


@pytest.mark.parametrize("frequent,stopped_at", [(1, 7), (1000, 8)])
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, frequent, stopped_at):
    """NaN from step 5 on, limit 3: the run of 3 is complete at step 7. The counters live on the device and are read
    at the logging interval and before each save: frequent=1 stops at 7; frequent=1000 reads only at the epoch end
    (step 8) and stops there before the epoch-end save, so the epoch-0 checkpoint is never overwritten."""
    class NaNAfterFour(train.PartialFC):
        calls = 0

        def forward(self, *args, **kwargs):
            loss = super().forward(*args, **kwargs)
            NaNAfterFour.calls += 1
            return loss * float("nan") if NaNAfterFour.calls > 4 else loss  # epoch 0 is clean

    monkeypatch.setattr(train, "PartialFC", NaNAfterFour)
    cfg = tiny_cfg(tmp_path, "save_all_states=True", "dpap=False", "max_nonfinite_steps=3", f"frequent={frequent}")
    result = train.train(cfg, CPU)
    assert result == {"status": "nonfinite", "global_step": stopped_at}
    assert NaNAfterFour.calls == stopped_at
    saved = final_state(tmp_path)
    assert saved["epoch"] == 1 and saved["global_step"] == 4  # the epoch-0 checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in saved["state_dict_backbone"].values() if v.is_floating_point())
    model = ckpt.load(tmp_path / "model.pt")  # skipped updates left the weights finite
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    log = (tmp_path / "training.log").read_text()
    assert (f"stopping at global step {stopped_at}: the loss was non-finite for 3 consecutive steps (reached at "
            f"global step 7, last non-finite at global step {stopped_at})") in log
    if frequent == 1:
        assert "non-finite loss in 1 of the last 1 step(s), the last at global step 5 (1 in a row now)" in log
    else:  # one read for the whole epoch 1: 4 steps, all non-finite
        assert "non-finite loss in 4 of the last 4 step(s), the last at global step 8 (4 in a row now)" in log


def test_nonfinite_burst_skips_the_update_on_the_device(tmp_path, monkeypatch):
    """A short NaN burst (below the limit) leaves the parameters, the AdamW moments and the AdamW step count exactly
    as they were (the fused kernel skips on the device) and training finishes."""
    class NaNBurst(train.PartialFC):
        calls = 0

        def forward(self, *args, **kwargs):
            loss = super().forward(*args, **kwargs)
            NaNBurst.calls += 1
            return loss * float("nan") if NaNBurst.calls in (3, 4) else loss

    monkeypatch.setattr(train, "PartialFC", NaNBurst)
    opts = ["save_all_states=True", "dpap=False", "max_nonfinite_steps=3", "num_epoch=2", "num_image=16"]  # 2+2 steps
    assert train.train(tiny_cfg(tmp_path, *opts), CPU, stop=lambda step: step == 2)["status"] == "preempted"
    before = final_state(tmp_path)
    assert before["global_step"] == 2 and NaNBurst.calls == 2
    # resumed: steps 3 and 4 (calls 3 and 4) are non-finite
    assert train.train(tiny_cfg(tmp_path, *opts, "resume=True"), CPU) == {"status": "finished", "global_step": 4}
    after = final_state(tmp_path)
    assert after["global_step"] == 4
    for key, value in before["state_dict_backbone"].items():
        if "running_" not in key and "num_batches" not in key:  # BatchNorm statistics follow the forward passes
            assert torch.equal(value, after["state_dict_backbone"][key]), key
    assert torch.equal(before["state_dict_softmax_fc"]["weight"], after["state_dict_softmax_fc"]["weight"])
    for index, state in before["state_optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state_optimizer"]["state"][index][name]), (index, name)
    assert float(after["state_optimizer"]["state"][0]["step"]) == 2  # the skipped steps were not counted
    assert after["state_lr_scheduler"]["last_epoch"] == 4  # the schedule advances as in the released code


def test_host_reads_only_at_logging_interval_and_epoch_end(tmp_path, monkeypatch):
    """Inside the training loop (after the model, optimiser and resume are set up) no tensor is read on the host
    except the one transfer of each sync point: every `frequent` steps and at the end of each epoch. Counted by
    patching the Tensor methods that copy to the host (item, tolist, __bool__, __float__, __int__, numpy). Ops that
    sync without such a call (e.g. nonzero) are not seen here."""
    reads, points = [], []
    in_loop = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if in_loop:
                reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    original_logging = train.CallBackLogging

    def start_counting(*args, **kwargs):  # built right before the first step
        in_loop.append(True)
        return original_logging(*args, **kwargs)

    original_read = train.NonFiniteMonitor.read

    def read(self, *args, **kwargs):
        points.append(len(reads))
        return original_read(self, *args, **kwargs)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(train, "CallBackLogging", start_counting)
    monkeypatch.setattr(train.NonFiniteMonitor, "read", read)
    # 8 steps per epoch, 2 epochs, frequent=3: reads at steps 3, 6, 8 (epoch end), 9, 12, 15, 16 (epoch end)
    cfg = tiny_cfg(tmp_path, "num_image=64", "frequent=3", "sample_rate=0.5", "dpap_prob=1.0")
    assert train.train(cfg, CPU) == {"status": "finished", "global_step": 16}
    assert len(points) == 7
    assert reads == ["tolist"] * 7 and points == list(range(7))  # each sync point is exactly one read


def _resume_agreement_worker(rank, world_size, folders):
    import logging
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    results = []
    for folder in folders:
        try:
            results.append(resume.load_resume(tiny_cfg(folder), env, logging.getLogger(f"resume{rank}"))["global_step"])
        except RuntimeError as e:
            results.append(str(e))
    return results


def _write_checkpoint(folder, rank, world_size, global_step, shard):
    os.makedirs(folder, exist_ok=True)
    ckpt.atomic_save({"world_size": world_size, "global_step": global_step, "step_in_epoch": 0,
                      "state_dict_softmax_fc": {"weight": shard},
                      "state_optimizer": {"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}},
                     ckpt.checkpoint_path(folder, rank))


def test_resume_refuses_checkpoints_of_different_saves(tmp_path):
    """2 ranks -> 1 rank -> 2 ranks: the 1-rank run rewrote checkpoint_gpu_0.pt (step 16) but the first run's
    checkpoint_gpu_1.pt (step 8) is still there. Resuming on 2 ranks must not let rank 1 silently go back to step
    8: every rank raises an error naming both files. Without the stale file both ranks resume at step 16 (rank 1
    re-partitions from the 1-rank save). A rank that cannot load its file fails with its own error and the other
    ranks stop too instead of waiting."""
    from dist_utils import run_distributed

    stale, clean, broken = tmp_path / "stale", tmp_path / "clean", tmp_path / "broken"
    for folder in (stale, clean):
        _write_checkpoint(folder, 0, 1, 16, torch.zeros(10, 32))
    _write_checkpoint(stale, 1, 2, 8, torch.zeros(5, 32))
    _write_checkpoint(broken, 0, 2, 8, torch.zeros(5, 32))
    (broken / "checkpoint_gpu_1.pt").write_bytes(b"garbage")
    ranks = run_distributed(_resume_agreement_worker, 2, [str(stale), str(clean), str(broken)])
    for rank in range(2):
        message = ranks[rank][0]
        assert ("cannot resume: the ranks would continue from different checkpoints (rank 0: checkpoint_gpu_0.pt at "
                "global step 16, rank 1: checkpoint_gpu_1.pt at global step 8)") in message, message
        assert "stale file" in message
        assert ranks[rank][1] == 16
    assert ranks[0][2] == "resume failed on rank(s) [1] (see their error); rank 0 stops too"
    assert ranks[1][2].startswith(f"cannot load checkpoint {ckpt.checkpoint_path(broken, 1)}")


def test_repartition_for_new_world_size(tmp_path):
    """Shards written by 2 ranks are merged and cut for 1 and 3 ranks; optimiser moments follow the centres."""
    cfg = tiny_cfg(tmp_path, "num_classes=11")
    full, moment, stats = torch.randn(11, 32), torch.randn(11, 32), torch.tensor(7.5)  # AdaFace's, same on all ranks
    for rank, (start, stop) in enumerate([(0, 6), (6, 11)]):
        ckpt.atomic_save({"world_size": 2, "step_in_epoch": 2,
                          "state_dict_softmax_fc": {"weight": full[start:stop], "margin_loss.running_std": stats},
                          "state_optimizer": {"state": {5: {"exp_avg": moment[start:stop], "step": torch.tensor(3.)}},
                                              "param_groups": [{"params": [0, 1, 2, 3, 4]}, {"params": [5]}]}},
                         ckpt.checkpoint_path(tmp_path, rank))
    for world, expected in [(1, [(0, 11)]), (3, [(0, 4), (4, 8), (8, 11)])]:
        for rank, (start, stop) in enumerate(expected):
            env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
            out = resume.repartition_states(cfg, env, ckpt.load(ckpt.checkpoint_path(tmp_path, 0)))
            assert torch.equal(out["state_dict_softmax_fc"]["weight"], full[start:stop])
            assert torch.equal(out["state_dict_softmax_fc"]["margin_loss.running_std"], stats)
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
    stale = ckpt.load(ckpt.checkpoint_path(tmp_path, 0))
    stale["global_step"] = 4
    ckpt.atomic_save(stale, ckpt.checkpoint_path(tmp_path, 0))
    with pytest.raises(RuntimeError, match=r"checkpoint_gpu_0\.pt was written by a run of 2 rank\(s\) at global "
                                           r"step 4, but this resume needs the checkpoints of 2 rank\(s\) at global "
                                           r"step 8"):
        resume.repartition_states(cfg, env, ckpt.load(ckpt.checkpoint_path(tmp_path, 1)))
    os.remove(ckpt.checkpoint_path(tmp_path, 1))
    with pytest.raises(FileNotFoundError, match=r"checkpoint_gpu_1\.pt is missing\. The previous run used 2 ranks "
                                                r"and all of its checkpoint files \(checkpoint_gpu_0\.pt \.\. "
                                                r"checkpoint_gpu_1\.pt\) are needed in the output folder"):
        resume.repartition_states(cfg, env, ckpt.load(ckpt.checkpoint_path(tmp_path, 0)))


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
    result = train.train(tiny_cfg(tmp_path, "amp=fp16", "num_epoch=1"), CPU)
    assert result == {"status": "finished", "global_step": 4}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recording.losses)
    assert "amp=fp16 needs CUDA; running on CPU with bf16 autocast instead (no GradScaler)" in (
        tmp_path / "training.log").read_text()


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_partial_fc_sampling_hooks_with_fused_optimisers(tmp_path, optimizer):
    """train.build_optimizer's fused optimisers keep Partial FC's register_optimizer contract: a step changes only
    the sampled centres (and their optimiser state), a step skipped through found_inf changes nothing, and both
    clear the sampled mask."""
    cfg = tiny_cfg(tmp_path, f"optimizer={optimizer}", "lr=0.1")
    backbone = torch.nn.Linear(4, 4)
    head = train.PartialFC(train.build_margin_loss(cfg), 8, 30, sample_rate=0.5)  # ArcFace
    opt = train.build_optimizer(cfg, backbone, head)
    assert all(group["fused"] for group in opt.param_groups)
    head.register_optimizer(opt)
    g = torch.Generator().manual_seed(0)

    def state():
        return {k: v.clone() for k, v in opt.state.get(head.weight, {}).items() if v.shape == head.weight.shape}

    for step, skip in enumerate([False, False, True, False]):
        head(torch.randn(6, 8, generator=g), torch.randint(0, 30, (6,), generator=g)).backward()
        sampled, before, state_before = head.sampled.clone(), head.weight.detach().clone(), state()
        assert sampled.any() and (~sampled).any()
        opt.found_inf = torch.tensor(float(skip))
        opt.step()
        del opt.found_inf
        opt.zero_grad(set_to_none=True)
        assert not head.sampled.any()
        frozen = ~sampled if not skip else torch.ones_like(sampled)
        assert torch.equal(head.weight[frozen], before[frozen])
        for key, after in state().items():
            assert torch.equal(after[frozen], state_before.get(key, torch.zeros_like(after))[frozen]), key
        if not skip:
            assert (head.weight[sampled] != before[sampled]).any(dim=1).all()
