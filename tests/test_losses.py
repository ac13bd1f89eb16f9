import math

import pytest
import torch

from losses import CombinedMarginLoss, ehsm_weights


def cos_batch(n=6, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, generator=g, dtype=dtype) * 1.8 - 0.9).requires_grad_()


LABELS = torch.tensor([0, 3, -1, 4, 1, -1])


def test_arcface_values_match_hand_computation():
    s, m = 64.0, 0.5
    cos = cos_batch()
    out = CombinedMarginLoss(s, 1.0, m, 0.0)(cos, LABELS)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = cos[i, j].item()
            if LABELS[i] == j:
                assert out[i, j].item() == pytest.approx(math.cos(math.acos(c) + m) * s, rel=1e-13, abs=1e-12)
            else:  # non-target entries and rows with label -1: exactly s*cos
                assert out[i, j].item() == c * s
    # float32 input works too, result within float32 precision
    cos32 = cos.detach().float()
    out32 = CombinedMarginLoss(s, 1.0, m, 0.0)(cos32, LABELS)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out.detach(), rtol=1e-5, atol=1e-4)


def test_arcface_gradient_is_straight_through():
    s = 64.0
    cos = cos_batch()
    out = CombinedMarginLoss(s, 1.0, 0.5, 0.0)(cos, LABELS)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    assert torch.equal(cos.grad, s * g)  # margin derivative ignored, also on the target entries


def test_cosface_values_and_gradient():
    s, m3 = 30.0, 0.4
    cos = cos_batch()
    out = CombinedMarginLoss(s, 1.0, 0.0, m3)(cos, LABELS)
    expected = cos.detach().clone()
    for i, y in enumerate(LABELS.tolist()):
        if y != -1:
            expected[i, y] -= m3
    assert torch.equal(out.detach(), expected * s)
    out.sum().backward()
    assert torch.equal(cos.grad, torch.full_like(cos, s))


def test_interclass_filtering():
    s, tau = 2.0, 0.3
    cos = cos_batch()
    out = CombinedMarginLoss(s, 1.0, 0.0, 0.3, interclass_filtering_threshold=tau)(cos, LABELS)
    c = cos.detach()
    expected = torch.where(c > tau, torch.zeros_like(c), c)
    keep_target = torch.zeros_like(c, dtype=torch.bool)
    for i, y in enumerate(LABELS.tolist()):
        if y != -1:
            expected[i, y] = c[i, y] - 0.3
            keep_target[i, y] = True
    assert torch.equal(out.detach(), expected * s)
    out.sum().backward()
    # filtered entries get no gradient; kept entries (incl. every on-rank target) get s
    kept = (c <= tau) | keep_target
    assert torch.equal(cos.grad, torch.where(kept, torch.full_like(c, s), torch.zeros_like(c)))
    assert (c > tau).any() and ((c > tau) & keep_target).any()  # the case under test occurs


def test_all_minus_one_rows_untouched():
    cos = cos_batch()
    labels = torch.full((6,), -1)
    out = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)(cos, labels)
    assert torch.equal(out.detach(), cos.detach() * 64.0)
    # input not modified in place
    assert torch.equal(cos.detach(), cos_batch().detach())


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.1), (0.9, 0.0, 0.0), (1.0, 0.2, 0.35), (1.0, 0.0, -0.1)])
def test_invalid_combination_raises(m):
    with pytest.raises(ValueError):
        CombinedMarginLoss(64.0, *m)


def std_tokens(b=4, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, generator=g, dtype=torch.float64) * 2 + 0.05).requires_grad_()


def hand_weights(h, gamma, top_k, measure, reduction):
    out = []
    for row in h.tolist():
        vals = [math.log(v) + 0.5 + 0.5 * math.log(2 * math.pi) for v in row] if measure == "gaussian" else row
        vals = sorted(vals, reverse=True)[:top_k] if top_k else vals
        agg = sum(vals) / len(vals) if reduction == "mean" else sum(vals)
        out.append(1 + math.exp(-gamma * agg))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("measure", ["std", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_ehsm_weights_match_hand_formula(measure, reduction, top_k, gamma):
    h = std_tokens()
    w = ehsm_weights(h, gamma=gamma, top_k=top_k, measure=measure, reduction=reduction)
    torch.testing.assert_close(w, hand_weights(h.detach(), gamma, top_k, measure, reduction), rtol=1e-12, atol=0)
    assert w.shape == (4,) and not w.requires_grad


def test_ehsm_std_weights_in_range_and_default_is_release():
    h = std_tokens(b=64, n=144)
    w = ehsm_weights(h)
    assert ((w > 1) & (w <= 2)).all()
    torch.testing.assert_close(w, 1 + torch.exp(-h.detach().mean(1)), rtol=0, atol=0)
    # zero std -> weight exactly 2
    assert ehsm_weights(torch.zeros(2, 5)).tolist() == [2.0, 2.0]


def test_ehsm_gradient_only_when_not_detached():
    h = std_tokens()
    assert not ehsm_weights(h).requires_grad
    w = ehsm_weights(h, detach=False)
    w.sum().backward()
    expected = -torch.exp(-h.detach().mean(1, keepdim=True)) / h.shape[1] * torch.ones_like(h)
    torch.testing.assert_close(h.grad, expected)


def test_ehsm_invalid_options_raise():
    with pytest.raises(ValueError):
        ehsm_weights(torch.ones(2, 3), measure="shannon")
    with pytest.raises(ValueError):
        ehsm_weights(torch.ones(2, 3), reduction="max")
