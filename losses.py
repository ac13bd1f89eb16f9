"""Margin logits (CombinedMarginLoss, as arcface_torch) and EHSM sample weights (docs/method.md)."""
import math

import torch
from torch import nn


class CombinedMarginLoss(nn.Module):
    """cos logits [N,C] (labels: local class index or -1) -> scaled margin logits [N,C].

    ArcFace (m1=1, m3=0): target logit value cos(theta_y + m2), non-target values unchanged, gradient w.r.t.
    the input cos is `s` for every entry (straight-through, like the release, which edits the values in place
    under no_grad); no easy-margin fallback when theta+m2 > pi. CosFace (m1=1, m2=0, m3>0): target cos - m3
    with normal autograd. Anything else raises ValueError (at construction; the release raises in forward).
    Unlike the release's in-place arccos/cos round trip, non-target values stay bit-exact and the input
    tensor is not modified.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0.0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        if m1 == 1.0 and m3 == 0.0:
            self.kind = "arcface"
        elif m1 == 1.0 and m2 == 0.0 and m3 > 0:
            self.kind = "cosface"
        else:
            raise ValueError(f"unsupported margins (m1, m2, m3) = ({m1}, {m2}, {m3}): "
                             "use ArcFace (1, m, 0) or CosFace (1, 0, m)")

    def forward(self, logits, labels):
        # Masks instead of nonzero()/index_put: no data-dependent shapes, so no host-device sync in the step.
        on_rank = labels != -1
        safe_labels = labels.clamp(min=0).unsqueeze(1)
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, safe_labels, on_rank.unsqueeze(1))
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                # zero the too-similar negatives; the target column of on-rank rows is always kept
                keep = (logits <= self.interclass_filtering_threshold) | is_target
            logits = logits * keep
        target = logits.gather(1, safe_labels)  # [N, 1]; rows with label -1 are masked out below
        if self.kind == "arcface":
            with torch.no_grad():
                values = torch.where(is_target, torch.cos(torch.acos(target) + self.m2), logits)
            # value of `values`, gradient of `logits`: logits - logits.detach() is exactly 0
            logits = values + (logits - logits.detach())
        else:
            logits = torch.where(is_target, target - self.m3, logits)
        return logits * self.s


def ehsm_weights(patch_entropy, gamma=1.0, top_k=None, measure="std", reduction="mean", detach=True):
    """EHSM per-sample weights [B] = 1 + exp(-gamma * aggregate) from per-token stds `patch_entropy` [B,N].

    measure "std": the token std itself (released code); "gaussian": the Gaussian differential entropy
    log(sigma) + 1/2 + 1/2*log(2*pi) (the paper's formula, commented out in the release).
    top_k: aggregate over the k largest tokens only (None = all, the release's 144-of-144).
    reduction: "mean" (release) or "sum" (the paper figure). detach: weights carry no gradient (release).
    """
    if measure not in ("std", "gaussian"):
        raise ValueError(f"measure must be 'std' or 'gaussian', got {measure!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = patch_entropy.detach() if detach else patch_entropy
    if measure == "gaussian":
        h = torch.log(h) + 0.5 + 0.5 * math.log(2 * math.pi)
    if top_k is not None:
        h = torch.topk(h, top_k, dim=1).values
    agg = h.mean(dim=1) if reduction == "mean" else h.sum(dim=1)
    return 1 + torch.exp(-gamma * agg)
