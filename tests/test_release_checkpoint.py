"""Checkpoints of the released train.py: conversion, LR-schedule mapping and the optimiser-flag fix, on their own."""
import copy
import os

import pytest
import torch

from lr_scheduler import PolyScheduler
from tests.release_format import ReleasePolyScheduler, release_checkpoints, write_release_checkpoints
from utils import checkpoint as ckpt
from utils import release_checkpoint as rc
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dim": 16, "depth": 1, "num_heads": 2}'


def tiny_cfg(output, *opts):
    base = [f"output={output}", f"network_kwargs={TINY}", "embedding_size=16", "batch_size=8", "num_classes=10",
            "num_image=32", "num_epoch=3", "warmup_epoch=1", "lr=0.01", "weight_decay=0.1"]
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), base + list(opts))


def test_release_layout_is_recognised_and_converted(tmp_path):
    cfg = tiny_cfg(tmp_path)
    saved = write_release_checkpoints(cfg, 2, epoch=1, global_step=2)
    assert set(saved[0]) == rc.RELEASE_KEYS
    assert saved[0]["state_optimizer"]["param_groups"][0]["fused"] is None  # what the release's torch writes
    assert "warmup_lr_init" in saved[0]["state_lr_scheduler"] and "verbose" in saved[0]["state_lr_scheduler"]
    assert rc.release_world_size(str(tmp_path)) == 2
    for rank in range(2):
        ours = rc.load(ckpt.checkpoint_path(str(tmp_path), rank))
        assert (ours["epoch"], ours["step_in_epoch"], ours["global_step"], ours["world_size"]) == (1, 0, 2, 2)
        assert ours["from_release"] and ours["rng"] is None and ours["state_scaler"] == {}
        assert torch.equal(ours["state_dict_softmax_fc"]["weight"], saved[rank]["state_dict_softmax_fc"]["weight"])
        assert set(ours["state_lr_scheduler"]) == set(PolyScheduler(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 10, 0).state_dict())
    # our own checkpoints pass through untouched
    own = {"world_size": 1, "epoch": 3}
    ckpt.atomic_save(own, tmp_path / "checkpoint_gpu_0.pt")
    assert rc.load(tmp_path / "checkpoint_gpu_0.pt") == own
    # neither ours nor the release's: one line naming the file and both layouts
    ckpt.atomic_save({"epoch": 3}, tmp_path / "checkpoint_gpu_0.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_gpu_0\.pt: not a training checkpoint: expected this "
                                                   r"project's keys .* or the released train\.py's .*found \['epoch'\]"):
        rc.load(tmp_path / "checkpoint_gpu_0.pt")
    note = rc.resume_note(rc.from_release(saved[0], 2))
    assert note.startswith("resuming a checkpoint written by the released TransFace train.py (2 rank(s)): epoch 1, "
                           "global step 2;") and "GradScaler starts fresh" in note


def test_scheduler_mapping_continues_the_release_schedule():
    """After the mapping, every remaining iteration trains with the LR the release would have used."""
    def optimizer():
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.01)

    warmup, total, done = 4, 12, 2  # resumed inside the warm-up, continued through the decay
    release_opt = optimizer()
    release = ReleasePolyScheduler(release_opt, 0.01, total, warmup)
    for _ in range(done):
        release_opt.step()
        release.step()
    ours_opt = optimizer()
    ours = PolyScheduler(ours_opt, 0.01, total, warmup)
    ours.load_state_dict(rc.scheduler_state_from_release(release.state_dict()))
    assert ours.last_epoch == done - 1  # the release's counter is one behind its iteration count
    for _ in range(done, total):
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in release_opt.param_groups]
        release_opt.step()
        ours_opt.step()
        release.step()
        ours.step()
    assert not hasattr(ours, "warmup_lr_init") and not hasattr(ours, "verbose")
    with pytest.raises(ValueError, match=r"lacks \['max_steps'\]"):
        rc.scheduler_state_from_release({k: v for k, v in release.state_dict().items() if k != "max_steps"})


def fused_adamw(params, lr=0.01):
    """Our optimiser, as train.build_optimizer builds it."""
    return torch.optim.AdamW([{"params": params[:-1]}, {"params": params[-1:]}], lr=lr, weight_decay=0.1,
                             fused=True)


def test_optimizer_state_keeps_our_flags_and_the_nonfinite_skip(tmp_path):
    cfg = tiny_cfg(tmp_path)
    (saved,) = release_checkpoints(cfg, 1, epoch=1, global_step=3)
    from backbones import get_model
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs)
    backbone.load_state_dict(saved["state_dict_backbone"])
    head = torch.nn.Parameter(saved["state_dict_softmax_fc"]["weight"].clone())
    params = [*backbone.parameters(), head]

    # loaded as it is, the release's `fused: None` turns our optimiser into the for-loop AdamW ...
    plain = fused_adamw(params)
    plain.load_state_dict(copy.deepcopy(saved["state_optimizer"]))  # torch keeps the given moment tensors
    assert plain.param_groups[0]["fused"] is None
    for p in params:
        p.grad = torch.ones_like(p)
    plain.found_inf = torch.ones(())
    with pytest.raises(AssertionError, match="grad_scale and found_inf"):
        plain.step()

    # ... so load_optimizer_state puts our flags back: the device-side skip works
    ours = fused_adamw(params)
    ckpt.load_optimizer_state(ours, copy.deepcopy(saved["state_optimizer"]))
    assert [(g["fused"], g["foreach"], g["capturable"], g["differentiable"]) for g in ours.param_groups] == [
        (True, None, False, False)] * 2
    assert ours.param_groups[0]["lr"] == saved["state_optimizer"]["param_groups"][0]["lr"]
    before = [p.detach().clone() for p in params]
    steps = [ours.state[p]["step"].item() for p in params]
    ours.found_inf = torch.ones(())
    ours.step()
    del ours.found_inf
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and steps[0] == 3
    assert [ours.state[p]["step"].item() for p in params] == steps

    # a finite step continues the release's moments exactly as its own AdamW would
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    release_opt = torch.optim.AdamW([{"params": reference[:-1]}, {"params": reference[-1:]}], lr=0.01,
                                    weight_decay=0.1)
    release_opt.load_state_dict(copy.deepcopy(saved["state_optimizer"]))
    for p, r in zip(params, reference):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        r.grad = p.grad.clone()
    ours.found_inf = torch.zeros(())
    ours.step()
    release_opt.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach(), atol=1e-6, rtol=1e-5)
    assert ours.state[params[0]]["step"].item() == 4
