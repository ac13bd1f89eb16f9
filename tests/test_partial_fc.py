"""Partial FC against a single-process full-softmax reference; sampling and optimiser handling; resharding.

One 2-rank gloo run (module fixture) computes everything distributed; the tests compare its results with
references computed here.  Gradient convention asserted below: each rank's embedding gradient is W times
d(global-mean loss)/d(its embeddings), so DDP's average over W ranks gives the backbone the exact gradient.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from losses import CombinedMarginLoss
from partial_fc import DistSoftmaxCrossEntropy, PartialFC, class_range, merge_shards, shard_for_rank

W = 2  # ranks
B = 4  # local batch
E = 16  # embedding size
C = 11  # classes (uneven: 6 + 5)
MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4)}
CASES = [(margin, ehsm) for margin in MARGINS for ehsm in (False, True)]

# sampling runs: C_S classes, sample_rate 0.5 -> 7 of 15 (rank 0) or 7 of 14 (rank 1) centres, several steps
C_S = 29
RATE = 0.5
STEPS = 4
# WebFace42M's class count at sample_rate 0.3 (small embeddings): 308,985 + 308,985 of 2,059,906 centres sampled
C_WF, RATE_WF, E_WF = 2_059_906, 0.3, 8
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def make_data():
    g = torch.Generator().manual_seed(0)
    s_labels = torch.randint(0, C_S, (STEPS, W * B), generator=g)
    s_labels[-1] = torch.randperm(15, generator=g)[:W * B]  # 8 positives on rank 0 > 7 samples: positives only
    return {
        "emb": torch.randn(W * B, E, generator=g),
        "labels": torch.randint(0, C, (W * B,), generator=g),
        "ehsm": 1 + torch.rand(W * B, generator=g),
        "weight": torch.randn(C, E, generator=g) * 0.01,
        "s_emb": torch.randn(STEPS, W * B, E, generator=g),
        "s_labels": s_labels,
        "s_weight": torch.randn(C_S, E, generator=g) * 0.01,
        "wf_emb": torch.randn(W * B, E_WF, generator=g),
        "wf_labels": torch.randint(0, C_WF, (W * B,), generator=g),
    }


def head_loss(head, emb, labels, ehsm):
    """Loss, embedding grad and centre grad of one forward/backward of `head` on (emb, labels)."""
    emb = emb.clone().requires_grad_()
    head.weight.grad = None
    loss = head(emb, labels, ehsm)
    loss.backward()
    return loss.detach(), emb.grad, head.weight.grad.clone()


def state_of(optimizer, param):
    return {k: v.clone() for k, v in optimizer.state.get(param, {}).items() if torch.is_tensor(v) and v.dim() == 2}


def two_rank_worker(rank, world_size, data):
    torch.manual_seed(100 + rank)
    local = slice(rank * B, (rank + 1) * B)
    out = {"init_weight": PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C).state_dict()["weight"]}

    # sample_rate 1: exact checks (fp32) and one bf16 autocast run
    for margin, ehsm in CASES:
        head = PartialFC(CombinedMarginLoss(*MARGINS[margin]), E, C)
        head.weight.data.copy_(shard_for_rank(data["weight"], rank, world_size))
        out[margin, ehsm] = head_loss(head, data["emb"][local], data["labels"][local],
                                      data["ehsm"][local] if ehsm else None)
    head.amp_dtype = torch.bfloat16
    out["bf16"] = head_loss(head, data["emb"][local], data["labels"][local], data["ehsm"][local])

    # sample_rate < 1: per step record what was sampled and the centres/optimiser state around the step
    for name, make_optimizer in OPTIMIZERS.items():
        head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C_S, sample_rate=RATE)
        head.weight.data.copy_(shard_for_rank(data["s_weight"], rank, world_size))
        optimizer = make_optimizer(head.parameters())
        head.register_optimizer(optimizer)
        steps = []
        for step in range(STEPS):
            before, state_before = head.weight.detach().clone(), state_of(optimizer, head.weight)
            emb = data["s_emb"][step][local].clone().requires_grad_()
            loss = head(emb, data["s_labels"][step][local])
            loss.backward()
            sampled, grad = head.sampled.clone(), head.weight.grad.clone()
            optimizer.step()
            optimizer.zero_grad()
            steps.append({"loss": loss.detach(), "sampled": sampled, "grad": grad, "emb_grad": emb.grad,
                          "before": before, "after": head.weight.detach().clone(),
                          "state_before": state_before, "state_after": state_of(optimizer, head.weight),
                          "sampled_after_step": head.sampled.clone()})
        out[name] = steps

    # 2.06 M classes, sample_rate 0.3: return only the sampled rows (the shard is 1 M rows)
    head = PartialFC(CombinedMarginLoss(*MARGINS["cosface"]), E_WF, C_WF, sample_rate=RATE_WF)
    emb = data["wf_emb"][local].clone().requires_grad_()
    loss = head(emb, data["wf_labels"][local], data["ehsm"][local])
    loss.backward()
    rows = head.sampled.nonzero().squeeze(1)
    out["wf"] = {"loss": loss.detach(), "emb_grad": emb.grad, "classes": rows + head.class_start,
                 "centres": head.weight.detach()[rows], "grad": head.weight.grad[rows],
                 "grad_elsewhere": head.weight.grad[~head.sampled].abs().max()}
    return out


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def ranks(data):
    return run_distributed(two_rank_worker, W, data)


def reference(emb, labels, weight, margin, ehsm=None):
    """Single-process full softmax: loss = -(1/N) sum_b w_b log max(softmax(margin(cos))_{b, y_b}, 1e-30) and the
    gradients of the unclamped loss (the clamp only guards the value).  Float64, returned as float32."""
    emb = emb.double().requires_grad_()
    weight = weight.double().requires_grad_()
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    logits = CombinedMarginLoss(*MARGINS[margin])(cos, labels)
    log_p = logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    w = torch.ones(len(labels)) if ehsm is None else ehsm
    (-(w.double() * log_p).sum() / len(labels)).backward()
    loss = -(w.double() * log_p.clamp(min=math.log(1e-30))).sum() / len(labels)
    return loss.detach().float(), emb.grad.float(), weight.grad.float()


def close(actual, expected, tol=1e-5):
    """Equal to `tol` relative to the tensor's scale (centre gradients are ~100: s=64 and |centre| ~ 0.04)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def test_cross_entropy_clamps_value_not_gradient():
    """p_y = e^-100 < 1e-30: the loss is w * -log(1e-30) / N, the gradient still w * (p - onehot) / N."""
    logits = torch.tensor([[0.0, 100.0], [3.0, 1.0]], requires_grad=True)
    weights = torch.tensor([1.5, 1.0])
    loss = DistSoftmaxCrossEntropy.apply(logits, torch.tensor([0, 1]), weights)
    loss.backward()
    p = logits.detach().softmax(dim=1)
    close(loss.detach(), (1.5 * -math.log(1e-30) - p[1, 1].log()) / 2)
    close(logits.grad, torch.stack([1.5 * (p[0] - torch.tensor([1.0, 0.0])), p[1] - torch.tensor([0.0, 1.0])]) / 2)


def test_sharding_formula():
    assert [class_range(7, r, 2) for r in range(2)] == [(0, 4), (4, 3)]
    assert [class_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 2), (5, 2)]
    assert [class_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]


def test_init_shape_and_distribution(ranks):
    shards = [r["init_weight"] for r in ranks]
    assert [s.shape for s in shards] == [(6, E), (5, E)]
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), 64, 2000)  # world of one: all classes
    assert list(head.state_dict()) == ["weight"] and head.weight.shape == (2000, 64)
    assert abs(head.weight.std().item() - 0.01) < 5e-4 and abs(head.weight.mean().item()) < 5e-4


@pytest.mark.parametrize("margin,ehsm", CASES)
def test_two_ranks_match_full_softmax(ranks, data, margin, ehsm):
    ref_loss, ref_emb_grad, ref_weight_grad = reference(data["emb"], data["labels"], data["weight"], margin,
                                                        data["ehsm"] if ehsm else None)
    for rank, r in enumerate(ranks):
        loss, emb_grad, weight_grad = r[margin, ehsm]
        close(loss, ref_loss)  # the same global-mean loss on every rank
        # all-gather backward: W * d(loss)/d(local embeddings); DDP then divides by W
        close(emb_grad, W * ref_emb_grad[rank * B:(rank + 1) * B])
        # centres are not averaged by DDP: plain d(loss)/d(shard)
        close(weight_grad, shard_for_rank(ref_weight_grad, rank, W))


def test_ehsm_weights_change_the_loss(ranks):
    assert not torch.allclose(ranks[0]["arcface", True][0], ranks[0]["arcface", False][0])


@pytest.mark.parametrize("margin,ehsm", CASES)
def test_world_of_one_equals_two_ranks(ranks, data, margin, ehsm):
    head = PartialFC(CombinedMarginLoss(*MARGINS[margin]), E, C)  # no process group
    head.load_state_dict({"weight": merge_shards([shard_for_rank(data["weight"], r, W) for r in range(W)])})
    loss, emb_grad, weight_grad = head_loss(head, data["emb"], data["labels"], data["ehsm"] if ehsm else None)
    close(loss, ranks[0][margin, ehsm][0])
    close(W * emb_grad, torch.cat([r[margin, ehsm][1] for r in ranks]))
    close(weight_grad, merge_shards([r[margin, ehsm][2] for r in ranks]))


def test_bf16_autocast_close_to_fp32(ranks):
    for r in ranks:
        loss, emb_grad, weight_grad = r["bf16"]
        ref_loss, ref_emb_grad, ref_weight_grad = r["cosface", True]
        assert loss.dtype == torch.float32 and loss.isfinite() and loss != ref_loss  # bf16 really used
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
        torch.testing.assert_close(emb_grad, ref_emb_grad, rtol=0, atol=5e-2 * ref_emb_grad.abs().max().item())
        torch.testing.assert_close(weight_grad, ref_weight_grad, rtol=0, atol=5e-2 * ref_weight_grad.abs().max().item())


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_outer_autocast_does_not_change_the_head(data, amp_dtype):
    """Only amp_dtype decides the matmul precision; an outer autocast (the backbone's) changes nothing."""
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C, amp_dtype=amp_dtype)
    head.load_state_dict({"weight": data["weight"]})
    expected = head_loss(head, data["emb"], data["labels"], data["ehsm"])
    emb = data["emb"].clone().requires_grad_()
    head.weight.grad = None
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = head(emb, data["labels"], data["ehsm"])
    loss.backward()  # outside autocast, as in training
    for a, b in zip((loss.detach(), emb.grad, head.weight.grad), expected):
        assert torch.equal(a, b)


def sampled_classes(ranks, name, step):
    """Global class ids of the centres sampled on all ranks at `step`, ascending."""
    ids = [torch.nonzero(r[name][step]["sampled"]).squeeze(1) + class_range(C_S, rank, W)[0]
           for rank, r in enumerate(ranks)]
    return torch.cat(ids)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sampling_keeps_positives(ranks, data, name):
    for step in range(STEPS):
        labels = data["s_labels"][step]
        for rank, r in enumerate(ranks):
            start, num_local = class_range(C_S, rank, W)
            positives = torch.unique(labels[(labels >= start) & (labels < start + num_local)]) - start
            sampled = r[name][step]["sampled"]
            assert sampled[positives].all()
            assert sampled.sum() == max(int(RATE * num_local), len(positives))
        assert torch.isin(labels, sampled_classes(ranks, name, step)).all()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sampled_loss_matches_reference_on_sampled_centres(ranks, data, name):
    for step in range(STEPS):
        classes = sampled_classes(ranks, name, step)
        weight = merge_shards([r[name][step]["before"] for r in ranks])
        labels = torch.searchsorted(classes, data["s_labels"][step])
        loss, emb_grad, weight_grad = reference(data["s_emb"][step], labels, weight[classes], "arcface")
        full_grad = torch.zeros_like(weight).index_copy_(0, classes, weight_grad)
        for rank, r in enumerate(ranks):
            close(r[name][step]["loss"], loss)
            close(r[name][step]["emb_grad"], W * emb_grad[rank * B:(rank + 1) * B])
            close(r[name][step]["grad"], shard_for_rank(full_grad, rank, W))  # unsampled rows: exactly 0


def test_sampling_at_webface42m_size_matches_reference_on_sampled_centres(ranks, data):
    """Loss and gradients (embeddings, sampled centres) of 2 ranks x 1.03 M centres at sample_rate 0.3 equal a
    one-process full softmax over the union of the centres the ranks sampled; unsampled centres get exactly 0."""
    labels = data["wf_labels"]
    for rank, r in enumerate(ranks):
        start, num_local = class_range(C_WF, rank, W)
        assert len(r["wf"]["classes"]) == int(RATE_WF * num_local) == 308_985
        mine = labels[(labels >= start) & (labels < start + num_local)]
        assert torch.isin(mine, r["wf"]["classes"]).all()
        assert r["wf"]["grad_elsewhere"] == 0
    classes = torch.cat([r["wf"]["classes"] for r in ranks])
    centres = torch.cat([r["wf"]["centres"] for r in ranks])
    loss, emb_grad, centre_grad = reference(data["wf_emb"], torch.searchsorted(classes, labels), centres, "cosface",
                                            data["ehsm"])
    for rank, r in enumerate(ranks):
        close(r["wf"]["loss"], loss)
        close(r["wf"]["emb_grad"], W * emb_grad[rank * B:(rank + 1) * B])
    close(torch.cat([r["wf"]["grad"] for r in ranks]), centre_grad)


def test_sample_is_the_unique_topk_rule(data):
    """sample() is the rule written with torch.unique: scores U(0,1), positives 2, top num_sample, sorted (the same
    random draw gives the same index); more positives than num_sample gives the positives alone."""
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, 1000, sample_rate=0.1)
    for labels in (torch.tensor([5, -1, 999, 5, 0, -1, 37, 412]), torch.randperm(1000)[:150]):
        torch.manual_seed(7)
        index, remapped = head.sample(labels)
        torch.manual_seed(7)
        positives = torch.unique(labels[labels >= 0])
        if len(positives) <= head.num_sample:
            scores = torch.rand(1000)
            scores[positives] = 2.0
            expected = scores.topk(head.num_sample).indices.sort().values
        else:
            expected = positives
        assert torch.equal(index, expected)
        assert torch.equal(remapped, torch.where(labels >= 0, torch.searchsorted(expected, labels.clamp(min=0)), -1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unsampled_centres_and_state_unchanged(ranks, name):
    for r in ranks:
        for step, s in enumerate(r[name]):
            frozen = ~s["sampled"]
            assert frozen.any() and s["sampled"].any()
            assert torch.equal(s["after"][frozen], s["before"][frozen])
            assert (s["after"][s["sampled"]] != s["before"][s["sampled"]]).all(dim=1).all()
            assert set(s["state_after"]) == ({"momentum_buffer"} if name == "sgd" else {"exp_avg", "exp_avg_sq"})
            for key, after in s["state_after"].items():
                before = s["state_before"].get(key, torch.zeros_like(after))  # lazily created state: zeros
                assert torch.equal(after[frozen], before[frozen])
                if step == 0 or name == "adamw":
                    assert (after[s["sampled"]] != 0).all()
            assert not s["sampled_after_step"].any()  # mask cleared by the step
        # over the steps every row was frozen at least once and updated at least once
        sampled = torch.stack([s["sampled"] for s in r[name]])
        assert (~sampled).any(0).sum() > 0 and sampled.any(0).sum() > 0


def test_sampling_off_in_eval_and_without_grad(data):
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C_S, sample_rate=RATE)
    head.load_state_dict({"weight": data["s_weight"]})
    full = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C_S)
    full.load_state_dict({"weight": data["s_weight"]})
    emb, labels = data["s_emb"][0], data["s_labels"][0]
    with torch.no_grad():
        head(emb, labels)
        assert not head.sampled.any()  # a no-grad forward (train.py's first pass) marks nothing
        head.eval()
        close(head(emb, labels), full(emb, labels))


def test_skipped_step_does_not_leak_sampled_rows(data):
    """A step skipped by GradScaler runs no hook; zero_grad + the next forward start a fresh mask."""
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C_S, sample_rate=RATE)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    head.register_optimizer(optimizer)
    head(data["s_emb"][0], data["s_labels"][0]).backward()
    optimizer.zero_grad()  # the skipped step
    head(data["s_emb"][1], data["s_labels"][1]).backward()
    sampled, before = head.sampled.clone(), head.weight.detach().clone()
    assert sampled.sum() == max(int(RATE * C_S), len(torch.unique(data["s_labels"][1])))
    optimizer.step()
    assert torch.equal(head.weight[~sampled], before[~sampled])


def test_gradient_accumulation_updates_the_union_of_samples(data):
    head = PartialFC(CombinedMarginLoss(*MARGINS["arcface"]), E, C_S, sample_rate=RATE)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=0.1)
    head.register_optimizer(optimizer)
    masks = []
    for step in range(2):  # two micro-batches, one optimiser step
        head(data["s_emb"][step], data["s_labels"][step]).backward()
        masks.append(head.sampled.clone())
    before = head.weight.detach().clone()
    optimizer.step()
    assert masks[0].sum() < masks[1].sum() and (masks[1] >= masks[0]).all()  # the mask accumulates
    frozen = ~masks[1]
    assert frozen.any()
    assert torch.equal(head.weight[frozen], before[frozen])
    assert (head.weight[~frozen] != before[~frozen]).all()
    assert (optimizer.state[head.weight]["exp_avg"][frozen] == 0).all()


def test_world_size_change_roundtrip(ranks):
    full = merge_shards([r["init_weight"] for r in ranks])
    assert full.shape == (C, E)
    assert torch.equal(shard_for_rank(full, 0, 1), full)
    for rank, r in enumerate(ranks):
        assert torch.equal(shard_for_rank(shard_for_rank(full, 0, 1), rank, W), r["init_weight"])
    # uneven class counts: C=7 over 2 and 3 ranks, 2 -> 1 -> 3 -> 2
    full7 = torch.randn(7, 5)
    two = [shard_for_rank(full7, r, 2) for r in range(2)]
    three = [shard_for_rank(merge_shards(two), r, 3) for r in range(3)]
    assert [s.shape[0] for s in two] == [4, 3] and [s.shape[0] for s in three] == [3, 2, 2]
    assert torch.equal(merge_shards(three), full7)
    back = [shard_for_rank(merge_shards(three), r, 2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(back, two))
    with pytest.raises(ValueError, match="rank order"):
        merge_shards([two[1], two[0]])
