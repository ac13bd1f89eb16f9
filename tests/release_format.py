"""Checkpoints in the layout of the released TransFace train.py, built with our own backbone and real torch objects.

The release trains with a plain torch AdamW (its state_dict has `fused: None` in every param group) and its own
PolyScheduler; it saves, per rank, {epoch, global_step, state_dict_backbone, state_dict_softmax_fc,
state_optimizer, state_lr_scheduler} to checkpoint_gpu_{rank}.pt.
"""
import copy
import os

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from backbones import get_model
from partial_fc import class_range


class ReleasePolyScheduler(LRScheduler):
    """The release's PolyScheduler, as it behaves: lr(e) = base_lr * e / W during warm-up, then
    base_lr * (1 - (e - W) / (T - W)) ** 2; the constructor sets lr(0) and then resets the counter to -1."""

    def __init__(self, optimizer, base_lr, max_steps, warmup_steps):
        self.base_lr = base_lr
        self.warmup_lr_init = 0.0001  # declared by the release, never used by its schedule
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.power = 2
        super().__init__(optimizer, -1)
        self.last_epoch = -1

    def get_lr(self):
        e = self.last_epoch
        if e == -1:
            lr = self.warmup_lr_init
        elif e < self.warmup_steps:
            lr = self.base_lr * e / self.warmup_steps
        else:
            lr = self.base_lr * (1 - (e - self.warmup_steps) / (self.max_steps - self.warmup_steps)) ** self.power
        return [lr] * len(self.optimizer.param_groups)

    def state_dict(self):
        # the torch of the release's time kept its `verbose` argument in the scheduler state
        return {**super().state_dict(), "verbose": False}


def release_schedule(cfg, world_size):
    """(warmup_step, total_step) as the release's train.py computes them."""
    steps_per_epoch = cfg.num_image // (cfg.batch_size * world_size)
    return steps_per_epoch * cfg.warmup_epoch, steps_per_epoch * cfg.num_epoch


def release_checkpoints(cfg, world_size, epoch, global_step, seed=0):
    """The per-rank dicts a release run of `world_size` ranks saves after `global_step` iterations (end of epoch
    `epoch`): one backbone (identical on every rank under DDP), the Partial FC shards of one full centre matrix,
    and a real torch AdamW + release PolyScheduler stepped `global_step` times with the same gradients on every
    rank (each rank's head gradient is its rows of the full one)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs)
    full = torch.normal(0.0, 0.01, (cfg.num_classes, cfg.embedding_size), generator=gen)
    grads = [([torch.randn(p.shape, generator=gen) for p in backbone.parameters()],
              torch.randn(full.shape, generator=gen)) for _ in range(global_step)]
    warmup_step, total_step = release_schedule(cfg, world_size)
    saved = []
    for rank in range(world_size):
        model = copy.deepcopy(backbone)
        start, num_local = class_range(cfg.num_classes, rank, world_size)
        head = nn.Module()
        head.weight = nn.Parameter(full[start:start + num_local].clone())
        optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": head.parameters()}], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        scheduler = ReleasePolyScheduler(optimizer, cfg.lr, total_step, warmup_step)
        for backbone_grads, head_grad in grads:
            for param, grad in zip(model.parameters(), backbone_grads):
                param.grad = grad.clone()
            head.weight.grad = head_grad[start:start + num_local].clone()
            optimizer.step()
            scheduler.step()
        saved.append({"epoch": epoch, "global_step": global_step, "state_dict_backbone": model.state_dict(),
                      "state_dict_softmax_fc": head.state_dict(), "state_optimizer": optimizer.state_dict(),
                      "state_lr_scheduler": scheduler.state_dict()})
    return saved


def write_release_checkpoints(cfg, world_size, epoch, global_step, seed=0):
    """Write them as checkpoint_gpu_{rank}.pt into cfg.output (plain torch.save, like the release)."""
    os.makedirs(cfg.output, exist_ok=True)
    saved = release_checkpoints(cfg, world_size, epoch, global_step, seed)
    for rank, state in enumerate(saved):
        torch.save(state, os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt"))
    return saved
