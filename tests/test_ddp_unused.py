"""DDP without find_unused_parameters: for every released ViT layout, with DPAP and EHSM on and off, two gloo ranks
running train.py's step get exactly the average of the gradients each rank computes alone (what a single process
computes from both ranks' batches), take the same AdamW step, and a second step does not fail (DDP raises there
when a trainable parameter got no gradient in the first)."""
import copy
import types

import torch
import torch.nn.functional as F
from easydict import EasyDict as edict

import train
from backbones import get_model
from dist_utils import run_distributed
from utils.distributed import DistEnv, wrap_ddp

LAYOUTS = ["vit_s_dp005_mask_0", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005"]
SWITCHES = [(dpap, ehsm) for dpap in (False, True) for ehsm in (False, True)]
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}  # released layout and depth-wise options, tiny widths
WORLD, BATCH, STEPS, CLASSES = 2, 4, 2, 6
AUTOCAST = dict(device_type="cpu", dtype=None, enabled=False)


class FixedHead(torch.nn.Module):
    """A frozen cosine classifier in place of Partial FC (whose shards live outside DDP), weighted like EHSM."""

    def __init__(self, dim):
        super().__init__()
        centres = torch.randn(CLASSES, dim, generator=torch.Generator().manual_seed(1))
        self.register_buffer("weight", F.normalize(centres, dim=1))

    def forward(self, embeddings, labels, weights=None):
        loss = F.cross_entropy(16 * F.normalize(embeddings) @ self.weight.T, labels, reduction="none")
        return (loss if weights is None else loss * weights).mean()


class RecordingAdamW(torch.optim.AdamW):
    """Fused AdamW that keeps the gradients it was given; with apply=False it only records them."""

    def __init__(self, params, apply=True):
        super().__init__(params, lr=1e-2, weight_decay=0.1, fused=True)
        self.apply, self.grads = apply, []

    def step(self, closure=None):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]])
        if self.apply:
            super().step(closure)


def config(dpap, ehsm):
    return edict(dpap=dpap, dpap_top_k=7, dpap_prob=1.0, dpap_alpha=1.0, ehsm=ehsm, ehsm_gamma=1.0, ehsm_top_k=None,
                 ehsm_measure="std", ehsm_reduction="mean", gradient_acc=1, grad_clip=1e9)  # clipping is a no-op


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, CLASSES, (BATCH,), generator=g)


def backbone_of(name):
    torch.manual_seed(0)
    return get_model(name, num_features=8, **TINY).train()


def step(model, optimizer, cfg, images, labels):
    head = FixedHead(8)
    train.train_step(model, head, optimizer, types.SimpleNamespace(step=lambda: None), None, cfg, [(images, labels)],
                     AUTOCAST)


def ddp_rank(rank, world_size):
    results = {}
    for name in LAYOUTS:
        for dpap, ehsm in SWITCHES:
            backbone = backbone_of(name)
            model = wrap_ddp(backbone, DistEnv(rank, rank, world_size, torch.device("cpu")))
            optimizer = RecordingAdamW(backbone.parameters())
            torch.manual_seed(100 + rank)  # masking, drop path and DPAP draw per rank
            for s in range(STEPS):
                step(model, optimizer, config(dpap, ehsm), *batch(s, rank))
            results[(name, dpap, ehsm)] = {"find_unused": model.find_unused_parameters, "grads": optimizer.grads,
                                           "state": backbone.state_dict()}
    return results


def reference(name, dpap, ehsm):
    """Both ranks simulated in this process without DDP: each computes its own gradient, then both take the optimiser
    step on the average. Each simulated rank keeps its own BatchNorm statistics and RNG stream, as the real ranks."""
    models = [backbone_of(name) for _ in range(WORLD)]
    optimizers = [RecordingAdamW(m.parameters(), apply=False) for m in models]
    rng = [torch.Generator().manual_seed(100 + r).get_state() for r in range(WORLD)]
    averages = []
    for s in range(STEPS):
        for r in range(WORLD):
            torch.set_rng_state(rng[r])
            step(models[r], optimizers[r], config(dpap, ehsm), *batch(s, r))
            rng[r] = torch.get_rng_state()
        local = [opt.grads[-1] for opt in optimizers]
        average = [None if g[0] is None else (g[0] + g[1]) / WORLD for g in zip(*local)]
        averages.append(average)
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), average):
                p.grad = None if g is None else g.clone()
            torch.optim.AdamW.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
    return averages, [m.state_dict() for m in models]


def test_ddp_gradients_equal_the_single_process_average(one_thread):
    ranks = run_distributed(ddp_rank, WORLD, timeout=300)
    for name in LAYOUTS:
        names = [n for n, _ in backbone_of(name).named_parameters()]
        for dpap, ehsm in SWITCHES:
            key = (name, dpap, ehsm)
            averages, states = reference(*key)
            # the parameters without a gradient are exactly the frozen ones: the mask token at mask ratio 0
            no_grad = {n for n, g in zip(names, averages[0]) if g is None}
            assert no_grad == ({"mask_token"} if name.endswith("mask_0") else set()), key
            for rank, result in enumerate(ranks):
                got = result[key]
                assert got["find_unused"] is False
                for s in range(STEPS):
                    for n, a, b in zip(names, averages[s], got["grads"][s]):
                        assert (a is None and b is None) or torch.equal(a, b), (key, rank, s, n)
                for k, v in states[rank].items():
                    assert torch.equal(v, got["state"][k]), (key, rank, k)
