"""Margin logits (CombinedMarginLoss, as arcface_torch; AdaFace) and EHSM sample weights (docs/method.md).

A margin loss maps (cos logits [N,C], labels [N] local class index or -1, feature norms [N]) to scaled logits;
partial_fc.PartialFC calls it on the global batch.  build_margin_loss(cfg) picks one from config.loss.
"""
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

    def forward(self, logits, labels, norms=None):
        """`norms` (the feature norms) is accepted for the common margin-loss signature; these margins ignore it."""
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


def adaface_logits(cos, labels, norms, mean, std, s=64.0, m=0.4, h=0.333, eps=1e-3):
    """AdaFace (Kim et al., CVPR 2022) scaled logits from cos [N,C], labels [N] (local index or -1), feature norms
    [N] and the running norm statistics `mean`, `std` (0-dim tensors).

    norm_hat = clip((clip(|z|, 0.001, 100) - mean) / (std + eps) * h, -1, 1), a constant (no gradient);
    target logit s * (cos(theta_y - m * norm_hat) - (m + m * norm_hat)), every other logit s * cos.
    As the authors' code: theta_y = acos(cos) with cos clamped to [-1 + eps, 1 - eps], theta_y - m * norm_hat
    clamped to [eps, pi - eps], eps added to std.  Unlike it, non-target logits are not clamped (bit-exact s * cos).
    """
    norm_hat = ((norms.detach().clamp(0.001, 100) - mean) / (std + eps) * h).clamp(-1, 1)
    on_rank = labels != -1
    safe_labels = labels.clamp(min=0).unsqueeze(1)
    is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, safe_labels, on_rank.unsqueeze(1))
    theta = torch.acos(cos.gather(1, safe_labels).squeeze(1).clamp(-1 + eps, 1 - eps))
    target = torch.cos((theta - m * norm_hat).clamp(eps, math.pi - eps)) - (m + m * norm_hat)
    return torch.where(is_target, target.unsqueeze(1), cos) * s


class AdaFaceLoss(nn.Module):
    """AdaFace margin with the running feature-norm statistics as buffers (saved in checkpoints, resumed).

    In training mode each forward first updates the statistics with the batch mean and (unbiased) std of the clipped
    norms, stat <- t_alpha * batch + (1 - t_alpha) * stat, then uses them; eval mode only reads them.  Initial
    values 20 and 100 and the clipping are the authors' code.  Under Partial FC the norms are those of the
    all-gathered global batch, so every rank computes the same statistics from the same numbers: the global
    batch's, identical on all ranks without a further collective.
    """

    def __init__(self, s=64.0, m=0.4, h=0.333, t_alpha=0.01):
        super().__init__()
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.register_buffer("running_mean", torch.tensor(20.0))
        self.register_buffer("running_std", torch.tensor(100.0))

    def forward(self, logits, labels, norms):
        if self.training:
            if norms.numel() < 2:
                raise ValueError("AdaFace needs at least 2 samples per (global) batch for the norm std")
            with torch.no_grad():
                clipped = norms.detach().float().clamp(0.001, 100)
                self.running_mean.lerp_(clipped.mean(), self.t_alpha)
                self.running_std.lerp_(clipped.std(), self.t_alpha)
        return adaface_logits(logits, labels, norms, self.running_mean, self.running_std, self.s, self.m, self.h)


def build_margin_loss(cfg):
    """The margin loss of config.loss: "combined" (ArcFace/CosFace from margin_list) or "adaface"."""
    if cfg.loss == "adaface":
        return AdaFaceLoss(cfg.margin_scale, cfg.adaface_m, cfg.adaface_h, cfg.adaface_t_alpha)
    return CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold)


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
