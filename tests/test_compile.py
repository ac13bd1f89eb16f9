"""torch.compile of the backbone (config.compile, eval_ijbc.py --compile): the ViT forward traces as one graph in
every mode training and evaluation use, and the compiled model computes what the eager one does, forward and one
whole training step. CPU inductor compiles take tens of seconds, so the models here are one block deep."""
import copy
import os

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import train
from backbones import get_model
from losses import CombinedMarginLoss
from lr_scheduler import PolyScheduler
from partial_fc import PartialFC
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=16, depth=1, num_heads=2, num_features=16)
AUTOCAST = dict(device_type="cpu", dtype=None, enabled=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # inductor draws its own random numbers unless told to use torch's: equal RNG streams for the comparisons
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["eval", "train_aux", "train_aux_no_grad"])
def test_vit_forward_has_no_graph_breaks(mode):
    model = get_model("vit_t", **TINY, drop_path_rate=0.1, mask_ratio=0.1)
    model.train(mode != "eval")
    x = torch.randn(2, 3, 112, 112)
    with torch.set_grad_enabled(mode != "train_aux_no_grad"):
        explanation = torch._dynamo.explain(lambda images: model(images, return_aux=mode != "eval"))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_equals_eager():
    torch.manual_seed(0)
    model = get_model("vit_t", **TINY).eval()
    compiled = copy.deepcopy(model)
    compiled.compile()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = model(x, return_aux=True)
        got = compiled(x, return_aux=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # compile() works in place: the checkpoint keys stay those of the plain module
    assert list(compiled.state_dict()) == list(model.state_dict())


def test_compiled_training_step_equals_eager():
    opts = ['network_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2, "drop_path_rate": 0.1, "mask_ratio": 0.1}',
            "embedding_size=16", "num_classes=10", "dpap_prob=1.0", "lr=0.1", "amp=none",
            "optimizer=sgd"]  # an update linear in the gradient: AdamW's first step is ~lr*sign(g), noisy at g ~ 0
    cfg = get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), opts)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g))]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs).train()
        if compiled:
            backbone.compile()
        head = PartialFC(CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list), cfg.embedding_size,
                         cfg.num_classes, cfg.sample_rate).train()
        optimizer = train.build_optimizer(cfg, backbone, head)
        head.register_optimizer(optimizer)
        scheduler = PolyScheduler(optimizer, cfg.lr, 10, 0)
        torch.manual_seed(2)  # the same DPAP gates, token masks and drop-path draws in both runs
        loss, found_inf = train.train_step(backbone, head, optimizer, scheduler, None, cfg, batches, AUTOCAST)
        results.append((loss, found_inf, backbone.state_dict(), head.weight.detach().clone()))
    (loss_e, inf_e, state_e, head_e), (loss_c, inf_c, state_c, head_c) = results
    assert inf_e.item() == inf_c.item() == 0.0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(head_c, head_e, rtol=1e-4, atol=1e-5)
