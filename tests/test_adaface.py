"""AdaFace against references written from its paper's equations (Kim et al., CVPR 2022, eqs. for g_angle, g_add,
norm_hat and the EMA of the norm statistics), alone and through Partial FC on 2 gloo ranks.

Paper: target logit s * (cos(theta_y + g_angle) - g_add), g_angle = -m * norm_hat, g_add = m * norm_hat + m,
norm_hat = clip((|z| - mu) / (sigma / h), -1, 1) with no gradient, mu/sigma an EMA (weight t_alpha) of the batch
mean/std of the norms; every other logit s * cos.  The implementation adds 1e-3 to sigma and clips the norms to
[0.001, 100] before the statistics, as the authors' code does: the references below say where they use that.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from losses import AdaFaceLoss, CombinedMarginLoss, adaface_logits, build_margin_loss
from partial_fc import PartialFC, class_range, merge_shards, shard_for_rank

S, M, H = 64.0, 0.4, 0.333
EPS = 1e-3  # the authors' code: added to sigma


def paper_logit(c, target, z, mu, sigma):
    """(value, d value / d c) of one logit from the paper's equations, by hand (derivative included)."""
    if not target:
        return S * c, S
    norm_hat = min(1.0, max(-1.0, (z - mu) / (sigma / H)))
    g_angle, g_add = -M * norm_hat, M * norm_hat + M
    theta = math.acos(c)
    # d/dc cos(acos(c) + g) = sin(acos(c) + g) / sin(acos(c)); norm_hat is a constant
    return S * (math.cos(theta + g_angle) - g_add), S * math.sin(theta + g_angle) / math.sin(theta)


def test_logits_and_gradient_match_the_paper():
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(7, 5, generator=g) * 1.6 - 0.8).requires_grad_()  # acos clamps and theta clip never bind
    labels = torch.tensor([0, 3, -1, 4, 2, 1, 3])
    norms = torch.tensor([0.5, 8.0, 9.0, 11.0, 13.0, 30.0, 10.2], requires_grad=True)  # norm_hat from -1 to 1
    mean, std = torch.tensor(10.0), torch.tensor(2.0)
    upstream = torch.randn(7, 5, generator=g)
    logits = adaface_logits(cos, labels, norms, mean, std, S, M, H)
    (logits * upstream).sum().backward()
    expected, expected_grad = torch.zeros(7, 5, dtype=torch.float64), torch.zeros(7, 5, dtype=torch.float64)
    hats = []
    for i in range(7):
        hats.append((norms[i].item() - 10.0) / ((2.0 + EPS) / H))
        for j in range(5):
            expected[i, j], d = paper_logit(cos[i, j].item(), j == labels[i].item(), norms[i].item(), 10.0, 2.0 + EPS)
            expected_grad[i, j] = d * upstream[i, j].item()
    assert min(hats) < -1 and max(hats) > 1 and any(-1 < x < 1 for x in hats)  # both clips and the linear part
    torch.testing.assert_close(logits.detach().double(), expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(cos.grad.double(), expected_grad, rtol=1e-5, atol=1e-4)
    assert norms.grad is None  # no gradient through norm_hat
    assert torch.equal(logits[2], cos[2].detach() * S)  # a row whose class is on another rank: untouched


def test_running_statistics_are_the_ema_of_clipped_batch_statistics():
    loss = AdaFaceLoss(S, M, H, t_alpha=0.01).train()
    assert (loss.running_mean.item(), loss.running_std.item()) == (20.0, 100.0)
    mu, sigma = 20.0, 100.0
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        norms = torch.rand(6, generator=g) * 30
        norms[0] = 150.0 if step == 0 else 1e-5  # clipped to 100 / 0.001 before the statistics
        cos, labels = torch.rand(6, 4, generator=g) - 0.5, torch.randint(0, 4, (6,), generator=g)
        logits = loss(cos, labels, norms)
        clipped = np.clip(norms.double().numpy(), 0.001, 100)
        mu = 0.01 * clipped.mean() + 0.99 * mu
        sigma = 0.01 * clipped.std(ddof=1) + 0.99 * sigma
        assert loss.running_mean.item() == pytest.approx(mu, rel=1e-6)
        assert loss.running_std.item() == pytest.approx(sigma, rel=1e-6)
        # the batch's logits use the statistics updated with that batch
        assert torch.equal(logits, adaface_logits(cos, labels, norms, loss.running_mean, loss.running_std, S, M, H))
    loss.eval()
    before = loss.state_dict()
    loss(cos, labels, norms * 2)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())  # eval reads, never updates


def test_statistics_are_in_the_head_state_dict_and_load_back():
    loss = AdaFaceLoss().train()
    loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([5.0, 6.0, 7.0, 9.0]))
    head = PartialFC(loss, 8, 3)
    state = head.state_dict()
    assert sorted(state) == ["margin_loss.running_mean", "margin_loss.running_std", "weight"]
    fresh = PartialFC(AdaFaceLoss(), 8, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.margin_loss.running_mean, loss.running_mean) and loss.running_mean != 20.0


def test_build_margin_loss_from_config():
    from utils.utils_config import get_config
    cfg = get_config("configs/tiny_cpu.py")
    assert cfg.loss == "combined" and isinstance(build_margin_loss(cfg), CombinedMarginLoss)
    ada = build_margin_loss(get_config("configs/tiny_cpu.py", ["loss=adaface"]))
    assert isinstance(ada, AdaFaceLoss) and (ada.s, ada.m, ada.h, ada.t_alpha) == (64.0, 0.4, 0.333, 0.01)


# ---- through Partial FC on 2 ranks: the global batch's statistics, identical on the ranks; sampled centres; EHSM
W, B, E = 2, 4, 16
C, C_S, RATE = 11, 29, 0.5
STEPS, T_ALPHA = 2, 0.1
START = (6.0, 3.0)  # running (mean, std) at the start, so norm_hat reaches both clips with these norms


def make_data():
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(STEPS, W * B, 1, generator=g) * 3 + 0.2  # norms about 0.8 .. 13
    return {"emb": torch.randn(STEPS, W * B, E, generator=g) * scale,
            "labels": torch.randint(0, C_S, (STEPS, W * B), generator=g),
            "ehsm": 1 + torch.rand(STEPS, W * B, generator=g),
            "weight": torch.randn(C_S, E, generator=g) * 0.01}


def adaface_head(num_classes, sample_rate):
    loss = AdaFaceLoss(S, M, H, T_ALPHA)
    loss.load_state_dict({"running_mean": torch.tensor(START[0]), "running_std": torch.tensor(START[1])})
    return PartialFC(loss, E, num_classes, sample_rate).train()


def two_rank_worker(rank, world_size, data):
    torch.manual_seed(10 + rank)
    local = slice(rank * B, (rank + 1) * B)
    out = {}
    for num_classes, rate in ((C, 1.0), (C_S, RATE)):
        head = adaface_head(num_classes, rate)
        head.weight.data.copy_(shard_for_rank(data["weight"][:num_classes], rank, world_size))
        steps = []
        for step in range(STEPS):
            emb = data["emb"][step][local].clone().requires_grad_()
            head.weight.grad = None
            loss = head(emb, data["labels"][step][local] % num_classes, data["ehsm"][step][local])
            loss.backward()
            steps.append({"loss": loss.detach(), "emb_grad": emb.grad, "grad": head.weight.grad.clone(),
                          "sampled": head.sampled.clone() if rate < 1 else torch.ones(head.num_local, dtype=bool),
                          "stats": (head.margin_loss.running_mean.clone(), head.margin_loss.running_std.clone())})
        out[rate] = steps
    return out


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def ranks(data):
    return run_distributed(two_rank_worker, W, data)


def paper_stats(data):
    """(mu, sigma) after each step, float64, from the concatenated global batches."""
    mu, sigma, out = *START, []
    for step in range(STEPS):
        z = np.clip(data["emb"][step].double().norm(dim=1).numpy(), 0.001, 100)
        mu = T_ALPHA * z.mean() + (1 - T_ALPHA) * mu
        sigma = T_ALPHA * z.std(ddof=1) + (1 - T_ALPHA) * sigma
        out.append((mu, sigma))
    return out


def paper_loss(emb, labels, weight, ehsm, mu, sigma):
    """Full-softmax EHSM-weighted cross-entropy over `weight`'s classes with the paper's AdaFace logits, float64 ->
    (loss, d/d emb, d/d weight); the gradients are those of the unclamped loss."""
    emb = emb.double().requires_grad_()
    weight = weight.double().requires_grad_()
    cos = F.linear(F.normalize(emb), F.normalize(weight))
    norm_hat = ((emb.detach().norm(dim=1) - mu) / ((sigma + EPS) / H)).clamp(-1, 1)
    target = cos.gather(1, labels[:, None]).squeeze(1)
    target = torch.cos(torch.acos(target) - M * norm_hat) - (M * norm_hat + M)
    logits = S * cos.scatter(1, labels[:, None], target[:, None])
    log_p = logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    (-(ehsm.double() * log_p).mean()).backward()
    # the head's cross-entropy clamps p_y at 1e-30 in the value only (a low-norm sample's target logit gets there)
    loss = -(ehsm.double() * log_p.clamp(min=math.log(1e-30))).mean()
    return loss.detach(), emb.grad, weight.grad


def close(actual, expected, tol=1e-5):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("rate", [1.0, RATE])
def test_statistics_identical_on_ranks_and_equal_to_the_global_batch(ranks, data, rate):
    single = adaface_head(C, 1.0)  # one process, the concatenated batches
    for step, (mu, sigma) in enumerate(paper_stats(data)):
        single.margin_loss(torch.zeros(W * B, C), data["labels"][step] % C, data["emb"][step].norm(dim=1))
        stats = [r[rate][step]["stats"] for r in ranks]
        assert all(torch.equal(a, b) for a, b in zip(stats[0], stats[1]))  # bit-identical on the ranks
        assert all(torch.equal(a, b) for a, b in zip(stats[0], (single.margin_loss.running_mean,
                                                                 single.margin_loss.running_std)))
        assert stats[0][0].item() == pytest.approx(mu, rel=1e-6)
        assert stats[0][1].item() == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("rate", [1.0, RATE])
def test_loss_and_gradients_match_the_paper_on_the_sampled_centres(ranks, data, rate):
    num_classes = C if rate == 1.0 else C_S
    for step, (mu, sigma) in enumerate(paper_stats(data)):
        ids = torch.cat([torch.nonzero(r[rate][step]["sampled"]).squeeze(1) + class_range(num_classes, k, W)[0]
                         for k, r in enumerate(ranks)])
        if rate < 1:
            assert len(ids) < num_classes  # really sampled
        labels = data["labels"][step] % num_classes
        loss, emb_grad, weight_grad = paper_loss(data["emb"][step], torch.searchsorted(ids, labels),
                                                 data["weight"][:num_classes][ids], data["ehsm"][step], mu, sigma)
        full_grad = torch.zeros(num_classes, E, dtype=torch.float64).index_copy_(0, ids, weight_grad)
        for k, r in enumerate(ranks):
            close(r[rate][step]["loss"], loss)
            close(r[rate][step]["emb_grad"], W * emb_grad[k * B:(k + 1) * B])  # the all-gather's W (DDP divides)
            close(r[rate][step]["grad"], shard_for_rank(full_grad, k, W))
        assert torch.equal(merge_shards([r[rate][step]["grad"] for r in ranks]).abs().sum(1) > 0,
                           torch.zeros(num_classes, dtype=torch.bool).index_fill_(0, ids, True))
