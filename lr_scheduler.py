"""Poly learning-rate schedule with linear warm-up (the release's lr_scheduler.py; docs/method.md).

lr(e) = base_lr * e / W                          for e < W
lr(e) = base_lr * (1 - (e - W) / (T - W))**power for W <= e <= T (0 after T)

e is the scheduler counter (`last_epoch`), stepped once per iteration. Standard torch semantics: after
construction the optimizer holds lr(0); after the i-th step() it holds lr(i). A loop that calls step() after
each optimizer step therefore trains iteration t (1-based) with lr(t-1).
The release instead evaluates lr(0) in its constructor and then resets the counter, so its iterations 1 and 2
both use lr(0)=0 and iteration t>=2 uses lr(t-2) (its logged LR at step t is lr(t-1)). We do not reproduce
that one-iteration lag; the values lr(e) are the release's.
A parameter group with an "lr_scale" entry (the backbone's when fine-tuning, finetune.py) trains with
lr(e) * lr_scale; every group of the released optimiser has scale 1.
"""
from torch.optim.lr_scheduler import LRScheduler


class PolyScheduler(LRScheduler):
    def __init__(self, optimizer, base_lr, max_steps, warmup_steps, power=2, last_epoch=-1):
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"need 0 <= warmup_steps < max_steps, got {warmup_steps}, {max_steps}")
        self.base_lr = base_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.power = power
        super().__init__(optimizer, last_epoch)

    def lr_at(self, e):
        if e < self.warmup_steps:
            return self.base_lr * e / self.warmup_steps
        frac = 1 - (e - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        return self.base_lr * max(frac, 0.0) ** self.power

    def get_lr(self):
        # the release uses one base lr for every parameter group (lr_scale 1)
        return [self.lr_at(self.last_epoch) * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # resume exactly even if the optimizer's own state (which holds the lr) is not restored
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_epoch) * group.get("lr_scale", 1.0)
