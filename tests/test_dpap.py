import numpy as np
import pytest
import torch

from dpap import dpap, dpap_plan, mix_amplitude


def quantised_batch(b, h, w, seed=0):
    """A batch as the loader produces it: uint8 pixels normalised by (v/255-0.5)/0.5 in float32."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    return (u8.float() / 255 - 0.5) / 0.5


def weights(b, n, seed=1):
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed))


def run(images, pw, seed, **kw):
    """dpap() and the plan it used (same seed -> same draws)."""
    out = dpap(images, pw, generator=torch.Generator().manual_seed(seed), **kw)
    kw.pop("patch_size", None)
    plan = dpap_plan(pw, generator=torch.Generator().manual_seed(seed), **kw)
    return out, plan


def patch_mask(plan, b, h, w, p):
    """Boolean [B,H,W]: pixels of the top-K patches of gated images."""
    gw = w // p
    mask = np.zeros((b, h, w), bool)
    for i in range(b):
        if plan.gate[i]:
            for t in plan.patches[i].tolist():
                r, c = divmod(t, gw)
                mask[i, r * p:(r + 1) * p, c * p:(c + 1) * p] = True
    return mask


def numpy_reference(images, plan, p):
    """Release-style per-image/per-patch loop with np.fft (partners read from the input batch).

    Returns (expected normalised batch, near-integer mask of pixels whose pre-truncation value is within
    1e-9 of an integer, where float64 rounding of two FFT implementations may legitimately differ by one).
    """
    x = images.numpy()
    px = (x.astype(np.float64) * 0.5 + 0.5) * 255
    out = x.copy()
    near = np.zeros(x.shape, bool)
    b, _, h, w = x.shape
    gw = w // p

    def box(t):
        r, c = divmod(int(t), gw)
        return slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)

    for i in range(b):
        if not plan.gate[i]:
            continue
        for k in range(plan.patches.shape[1]):
            rs, cs = box(plan.patches[i, k])
            s = px[i, :, rs, cs]
            prs, pcs = box(plan.partner_cell[i, k])
            q = px[int(plan.partner_image[i, k]), :, prs, pcs]
            lam = float(plan.lam[i, k])
            fs = np.fft.fft2(s)
            amp = lam * np.abs(np.fft.fft2(q)) + (1 - lam) * np.abs(fs)
            v = np.clip(np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(fs)))), 0, 255)
            near[i, :, rs, cs] = np.abs(v - np.round(v)) < 1e-9
            out[i, :, rs, cs] = (np.trunc(v).astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return out, near


@pytest.mark.parametrize("h,w,p", [(112, 112, 9), (64, 64, 8), (40, 60, 7)])
def test_matches_numpy_reference_and_untouched_pixels_bit_identical(h, w, p):
    b = 16
    images = quantised_batch(b, h, w)
    pw = weights(b, (h // p) * (w // p))
    out, plan = run(images, pw, seed=3, prob=0.5, patch_size=p, top_k=5)
    assert 0 < plan.gate.sum() < b
    expected, near = numpy_reference(images, plan, p)
    got = out.numpy()
    mask = patch_mask(plan, b, h, w, p)[:, None].repeat(3, axis=1)
    # outside the chosen patches of gated images (incl. ungated images and the border): bit-identical
    assert np.array_equal(got[~mask].view(np.uint32), images.numpy()[~mask].view(np.uint32))
    for i in range(b):
        if not plan.gate[i]:
            assert torch.equal(out[i], images[i])
    # inside: exactly the numpy result, except truncation of float64 values sitting on an integer
    assert np.array_equal(got[~near], expected[~near])
    assert np.all(np.abs(got[near] - expected[near]) <= 2 / 255 + 1e-6)
    assert near.mean() < 0.01


def test_perturbed_patch_has_source_phase_and_mixed_amplitude():
    images = quantised_batch(8, 112, 112)
    plan = dpap_plan(weights(8, 144), generator=torch.Generator().manual_seed(5), prob=1.0)
    gw, p = 12, 9
    px = (images.double() * 0.5 + 0.5) * 255
    i, k = 2, 4
    r, c = divmod(int(plan.patches[i, k]), gw)
    pr, pc = divmod(int(plan.partner_cell[i, k]), gw)
    s = px[i, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
    q = px[plan.partner_image[i, k], :, pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]
    lam = float(plan.lam[i, k])
    y = mix_amplitude(s, q, plan.lam[i, k]).numpy()

    fy, fs, fq = np.fft.fft2(y), np.fft.fft2(s.numpy()), np.fft.fft2(q.numpy())
    np.testing.assert_allclose(np.abs(fy), lam * np.abs(fq) + (1 - lam) * np.abs(fs), rtol=1e-9, atol=1e-8)
    # phase of source (compare unit phasors to avoid the +-pi wrap; |F| is far from 0 for these patches)
    assert np.abs(fs).min() > 1e-3
    np.testing.assert_allclose(fy / np.abs(fy), fs / np.abs(fs), atol=1e-9)
    # the result is not simply the source or the partner
    assert not np.allclose(y, s.numpy()) and not np.allclose(y, q.numpy())


def test_prob_zero_identical_and_prob_one_changes_every_image():
    images = quantised_batch(12, 112, 112)
    pw = weights(12, 144)
    assert torch.equal(dpap(images, pw, prob=0.0, generator=torch.Generator().manual_seed(0)), images)
    out = dpap(images, pw, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert all(not torch.equal(out[i], images[i]) for i in range(12))
    assert out.dtype == images.dtype and out.device == images.device
    assert not out.requires_grad


def test_selected_fraction_close_to_prob():
    # plan gate over many images, binomial 5-sigma bound
    n, prob = 20000, 0.2
    plan = dpap_plan(torch.rand(n, 4), top_k=2, prob=prob, generator=torch.Generator().manual_seed(7))
    sd = (n * prob * (1 - prob)) ** 0.5
    assert abs(int(plan.gate.sum()) - n * prob) < 5 * sd
    # and through dpap itself: images that changed
    images = quantised_batch(64, 36, 36)
    g = torch.Generator().manual_seed(8)
    changed = 0
    for _ in range(10):
        out = dpap(images, torch.rand(64, 16), patch_size=9, top_k=3, prob=prob, generator=g)
        changed += sum(not torch.equal(out[i], images[i]) for i in range(64))
    sd = (640 * prob * (1 - prob)) ** 0.5
    assert abs(changed - 640 * prob) < 5 * sd


def test_top_k_picks_highest_weights():
    b, n, k = 6, 144, 7
    pw = torch.randn(b, n, generator=torch.Generator().manual_seed(2))
    plan = dpap_plan(pw, top_k=k, prob=1.0, generator=torch.Generator().manual_seed(0))
    expected = np.argsort(-pw.numpy(), axis=1, kind="stable")[:, :k]
    assert np.array_equal(plan.patches.numpy(), expected)
    # and the cells that change are among those
    images = quantised_batch(b, 112, 112)
    out = dpap(images, pw, top_k=k, prob=1.0, generator=torch.Generator().manual_seed(0))
    diff = (out != images).any(1)[:, :108, :108].reshape(b, 12, 9, 12, 9).any(4).any(2).reshape(b, n)
    for i in range(b):
        assert set(torch.nonzero(diff[i]).flatten().tolist()) <= set(expected[i].tolist())


def test_plan_ranges_and_alpha():
    b, n = 50, 144
    plan = dpap_plan(torch.rand(b, n), top_k=7, alpha=0.3, generator=torch.Generator().manual_seed(1))
    assert plan.partner_image.shape == plan.partner_cell.shape == plan.lam.shape == (b, 7)
    assert 0 <= plan.partner_image.min() and plan.partner_image.max() < b
    assert 0 <= plan.partner_cell.min() and plan.partner_cell.max() < n
    assert 0 <= plan.lam.min() and plan.lam.max() < 0.3
    assert plan.partner_image.unique().numel() > b // 2  # partners come from across the batch


def test_generator_determinism_and_shape_check():
    images = quantised_batch(4, 112, 112)
    pw = weights(4, 144)
    a = dpap(images, pw, prob=1.0, generator=torch.Generator().manual_seed(9))
    b = dpap(images, pw, prob=1.0, generator=torch.Generator().manual_seed(9))
    c = dpap(images, pw, prob=1.0, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a non-contiguous (channels_last) batch gives the same result
    cl = dpap(images.to(memory_format=torch.channels_last), pw, prob=1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(cl, a)
    with pytest.raises(ValueError):
        dpap(images, weights(4, 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_device_and_matches_cpu_draws():
    images = quantised_batch(8, 112, 112)
    pw = weights(8, 144)
    out = dpap(images.cuda(), pw.cuda(), prob=1.0, generator=torch.Generator("cuda").manual_seed(0))
    assert out.is_cuda
    plan = dpap_plan(pw.cuda(), prob=1.0, generator=torch.Generator("cuda").manual_seed(0))
    plan = type(plan)(*(t.cpu() for t in plan))
    expected, near = numpy_reference(images, plan, 9)
    got = out.cpu().numpy()
    assert np.array_equal(got[~near], expected[~near])
