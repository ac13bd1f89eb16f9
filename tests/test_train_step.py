"""train.train_step against the TransFace step written out by hand: no-grad forward, dpap(), forward, EHSM weights,
Partial FC loss, backward, grad-norm clip, AdamW (or SGD), LR schedule. Also gradient accumulation and the
device-side skip of a non-finite step."""
import copy
import math
import os

import pytest
import torch

import train
from backbones import get_model
from dpap import dpap
from losses import CombinedMarginLoss, ehsm_weights
from lr_scheduler import PolyScheduler
from partial_fc import PartialFC
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.1}'
AUTOCAST = dict(device_type="cpu", dtype=None, enabled=False)
TOTAL_STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(*opts):
    base = ["network_kwargs=" + TINY, "embedding_size=32", "num_classes=10", "dpap_prob=1.0", "lr=0.01",
            "grad_clip=0.5", "amp=none"]
    return get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), base + list(opts))


def make_parts(cfg, seed=0):
    """(backbone, head, fused AdamW as train() builds it, PolyScheduler); random centres and weights."""
    torch.manual_seed(seed)
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs).train()
    head = PartialFC(CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold),
                     cfg.embedding_size, cfg.num_classes, cfg.sample_rate).train()
    optimizer = train.build_optimizer(cfg, backbone, head)
    head.register_optimizer(optimizer)
    return backbone, head, optimizer, PolyScheduler(optimizer, cfg.lr, TOTAL_STEPS, 0)


def micro_batches(cfg, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, cfg.num_classes, (4,), generator=g))
            for _ in range(count)]


def reference_step(cfg, backbone, head, adam, batches, lr):
    """The step by hand (AdamW, or the first step of SGD). adam: {param: (exp_avg, exp_avg_sq)} and adam["t"],
    updated in place. -> loss."""
    params = list(backbone.parameters()) + list(head.parameters())
    step_loss = 0.0
    for images, labels in batches:
        with torch.no_grad():
            _, patch_weights, _ = backbone(images, return_aux=True)
        images = dpap(images, patch_weights.float(), top_k=cfg.dpap_top_k, prob=cfg.dpap_prob,
                      patch_size=backbone.patch_size, alpha=cfg.dpap_alpha)
        embeddings, _, patch_entropy = backbone(images, return_aux=True)
        weights = ehsm_weights(patch_entropy.float(), gamma=cfg.ehsm_gamma, top_k=cfg.ehsm_top_k,
                               measure=cfg.ehsm_measure, reduction=cfg.ehsm_reduction)
        loss = head(embeddings, labels, weights)
        (loss / len(batches)).backward()
        step_loss += loss.item() / len(batches)
    with torch.no_grad():
        # clip the backbone's gradients to total L2 norm grad_clip
        grads = [p.grad for p in backbone.parameters() if p.grad is not None]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
        for g in grads:
            g.mul_(scale)
        if cfg.optimizer == "sgd":  # first step of SGD with momentum: the buffer is the decayed gradient
            for p in params:
                p.sub_(lr * (p.grad + cfg.weight_decay * p))
                p.grad = None
            return step_loss
        # AdamW: decoupled weight decay, bias-corrected moments
        adam["t"] += 1
        t, (b1, b2), eps = adam["t"], (0.9, 0.999), 1e-8
        for p in params:
            if p.grad is None:
                continue
            m, v = adam.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            p.mul_(1 - lr * cfg.weight_decay)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt() + eps
            p.sub_(lr * (m / (1 - b1 ** t)) / denom)
            p.grad = None
    return step_loss


def poly_lr(cfg, step):
    return cfg.lr * (1 - step / TOTAL_STEPS) ** 2


def assert_close(model, reference, atol=1e-6):
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("optimizer,gradient_acc", [("adamw", 1), ("adamw", 2), ("sgd", 2)])
def test_step_equals_reference(optimizer, gradient_acc):
    cfg = make_cfg(f"optimizer={optimizer}", f"gradient_acc={gradient_acc}")
    backbone, head, optimizer, scheduler = make_parts(cfg)
    ref_backbone, ref_head = copy.deepcopy(backbone), copy.deepcopy(head)
    batches = micro_batches(cfg, gradient_acc)
    torch.manual_seed(100)  # DPAP, token masking and drop-path draw the same numbers on both sides
    loss, found_inf = train.train_step(backbone, head, optimizer, scheduler, None, cfg, batches, AUTOCAST)
    torch.manual_seed(100)
    ref_loss = reference_step(cfg, ref_backbone, ref_head, {"t": 0}, batches, poly_lr(cfg, 0))
    assert loss.dim() == 0 and found_inf.dim() == 0 and float(found_inf) == 0.0
    assert abs(float(loss) - ref_loss) <= 1e-6 * abs(ref_loss)
    assert_close(backbone, ref_backbone)
    assert_close(head, ref_head)
    assert any(not torch.equal(a, b) for a, b in zip(backbone.parameters(), make_parts(cfg)[0].parameters()))
    assert scheduler.get_last_lr() == [poly_lr(cfg, 1)] * 2  # the schedule stepped once
    assert all(p.grad is None for p in list(backbone.parameters()) + list(head.parameters()))


def test_nonfinite_step_is_skipped_on_the_device():
    """A NaN loss: found_inf is 1, parameters and AdamW state stay exactly as they were, the schedule advances."""
    cfg = make_cfg()
    backbone, head, optimizer, scheduler = make_parts(cfg)
    train.train_step(backbone, head, optimizer, scheduler, None, cfg, micro_batches(cfg, 1), AUTOCAST)
    before = copy.deepcopy(optimizer.state_dict())
    params = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    head.margin_loss.s = float("nan")  # the logits and so the loss become NaN
    loss, found_inf = train.train_step(backbone, head, optimizer, scheduler, None, cfg, micro_batches(cfg, 1),
                                       AUTOCAST)
    assert math.isnan(float(loss)) and float(found_inf) == 1.0
    assert all(torch.equal(p, params[n]) for n, p in backbone.named_parameters())
    after = optimizer.state_dict()["state"]
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[index][key]), (index, key)
    assert float(after[0]["step"]) == 1
    assert scheduler.last_epoch == 2
