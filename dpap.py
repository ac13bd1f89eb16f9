"""DPAP: Dominant Patch Amplitude Perturbation (TransFace; docs/method.md), vectorized with torch.fft.

For each image that passes a per-image gate (probability `prob`), each of its `top_k` dominant patches
(largest `patch_weights`) gets the amplitude spectrum lambda*|F(q)| + (1-lambda)*|F(s)| with its source
phase kept, where q is a random partner patch (any image of the batch, any grid cell) and lambda ~ U(0, alpha).
Pixels are perturbed in [0, 255] space and truncated to integers like the released uint8 cast.

Deviations from the released (numpy, sequential, in-place) code:
- Partners are read from the un-modified input batch. The release reads them from the batch it is modifying
  in place, so its partner is already perturbed when it is a dominant patch of a gated image processed earlier
  in the loop: about prob * K/N / 2 of partners (~0.5% for 0.2 * 7/144 / 2). Such a partner is still a
  random patch of the batch, only one more perturbation away; we accept this to vectorize. Sources are never
  affected (each dominant patch is written once, after it is read), nor is anything else.
- The release mixes a centred crop of the fftshift-ed amplitudes of size floor(P*sqrt(ratio)); with its
  ratio = 1 the crop is the whole spectrum, so fftshift/ifftshift cancel and are omitted here.
- Gate: `u < prob` instead of the release's `u <= prob` (same distribution; makes prob=0 exactly a no-op).
- Spectra are computed in float64 (numpy 2 would compute the release's float32 patches in single precision,
  numpy 1 in double): only values that sit within rounding error of an integer can truncate differently.
- Draws come from torch (one generator) instead of python `random` + numpy's global RNG: same distributions,
  different streams.
"""
from collections import namedtuple

import torch

DpapPlan = namedtuple("DpapPlan", "gate patches partner_image partner_cell lam")


def dpap_plan(patch_weights, top_k=7, prob=0.2, alpha=1.0, generator=None):
    """All random draws of one dpap() call, for a batch whose patch grid has N = patch_weights.shape[1] cells.

    Returns DpapPlan of tensors on patch_weights.device: gate [B] bool, patches [B,K] (cell indices of the
    dominant patches, descending weight), partner_image [B,K], partner_cell [B,K], lam [B,K] float64.
    Draws are made for every image (also ungated ones) so the number of draws does not depend on the gate.
    """
    b, n = patch_weights.shape
    dev = patch_weights.device
    gate = torch.rand(b, generator=generator, device=dev) < prob
    patches = torch.topk(patch_weights, top_k, dim=1).indices
    partner_image = torch.randint(0, b, (b, top_k), generator=generator, device=dev)
    partner_cell = torch.randint(0, n, (b, top_k), generator=generator, device=dev)
    lam = torch.rand(b, top_k, generator=generator, device=dev, dtype=torch.float64) * alpha
    return DpapPlan(gate, patches, partner_image, partner_cell, lam)


def mix_amplitude(src, partner, lam):
    """lam*|F partner| + (1-lam)*|F src| with the phase of src, inverse FFT, real part (no quantisation).

    src, partner: [..., P, P] real; lam broadcastable to src. 2-D FFT over the last two (spatial) axes.
    Both inputs are real, so rfft2 holds the whole spectrum (the other half is its conjugate mirror) and the
    mixed spectrum stays Hermitian: irfft2 of it is the real part of the full ifft2, at half the cost.
    """
    fs = torch.fft.rfft2(src)
    mag = fs.abs()
    amp = lam * torch.fft.rfft2(partner).abs() + (1 - lam) * mag
    # source phase as a unit phasor (angle(0) = 0 like np.angle); avoids atan2/sin/cos of polar(amp, angle)
    phase = torch.where(mag > 0, fs / mag, 1)
    return torch.fft.irfft2(amp * phase, s=src.shape[-2:])


def dpap(images, patch_weights, top_k=7, prob=0.2, patch_size=9, alpha=1.0, generator=None):
    """Return a DPAP-perturbed copy of the normalised batch `images` [B,3,H,W] (values (v/255-0.5)/0.5).

    patch_weights [B, (H//P)*(W//P)] ranks the grid cells (row-major); the grid covers the top-left
    (H//P)*P x (W//P)*P pixels, the remaining border is never touched. Untouched pixels are bit-identical.
    `generator` (on images.device) or the global RNG supplies all randomness.
    """
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    if patch_weights.shape != (b, gh * gw):
        raise ValueError(f"patch_weights must be [{b}, {gh * gw}] for {h}x{w} images and patch {p}, "
                         f"got {list(patch_weights.shape)}")
    plan = dpap_plan(patch_weights, top_k, prob, alpha, generator)

    def grid_view(x):  # [B, gh, gw, C, P, P] view of the grid region (no copy; writes land in x)
        return x[:, :, :gh * p, :gw * p].unflatten(2, (gh, p)).unflatten(4, (gw, p)).permute(0, 2, 4, 1, 3, 5)

    out = images.clone()
    cells = grid_view(images)  # the un-modified input: sources and partners
    rows = torch.arange(b, device=images.device)[:, None]
    src = cells[rows, plan.patches // gw, plan.patches % gw]  # [B, K, C, P, P]
    partner = cells[plan.partner_image, plan.partner_cell // gw, plan.partner_cell % gw]

    def to_pixels(x):
        return (x.double() * 0.5 + 0.5) * 255

    mixed = mix_amplitude(to_pixels(src), to_pixels(partner), plan.lam[..., None, None, None])
    # clip then truncate (values are >= 0, so trunc == floor == the release's uint8 cast)
    quantised = mixed.clamp(0, 255).trunc().to(images.dtype)
    new = (quantised / 255 - 0.5) / 0.5
    new = torch.where(plan.gate[:, None, None, None, None], new, src)  # ungated: write back the originals
    grid_view(out)[rows, plan.patches // gw, plan.patches % gw] = new
    return out
