"""The exact memory accounting of bench/scale.py (docs/memory.md) against hand computations."""
import os

import torch
from torch import nn

from backbones import get_model
from bench.scale import (ROOT, SavedTensorBytes, adamw_state_bytes, fc_shard, gpu_estimate, measured_state_bytes,
                         param_stats, sampled_rows)
from utils.utils_config import get_config


def test_fc_shard_glint360k_on_8_ranks():
    # 360,232 = 8 * 45,029 exactly: every rank owns 45,029 centres of 512 float32
    assert fc_shard(360232, 8) == (45029, 45029 * 512 * 4)
    assert fc_shard(360232, 8, rank=7) == (45029, 92_219_392)


def test_fc_shard_ms1mv2_uneven_split():
    # 85,742 = 8 * 10,717 + 6: ranks 0-5 own one extra centre
    assert fc_shard(85742, 8, rank=0) == (10718, 10718 * 2048)
    assert fc_shard(85742, 8, rank=5)[0] == 10718
    assert fc_shard(85742, 8, rank=6)[0] == 10717
    assert sum(fc_shard(85742, 8, rank=r)[0] for r in range(8)) == 85742


def test_vit_s_parameter_bytes_are_count_times_4():
    with torch.device("meta"):
        model = get_model("vit_s_dp005_mask_0")
    count, nbytes = param_stats(model)
    d, n, depth = 512, 144, 12  # embed dim, patches (12 x 12 of 9 px), blocks
    block = 2 * d + 2 * d + 3 * d * d + d * d + d + d * 4 * d + 4 * d + 4 * d * d + d  # norms, qkv, proj, mlp
    head = n * d * d + 2 * d + d * 512 + 2 * 512 + n * d * n + n * n  # feature (with BNs) + SE gate
    embed = 3 * 9 * 9 * d + d + n * d + d  # patch conv, pos_embed, mask_token
    assert count == depth * block + head + embed + 2 * d  # + final LayerNorm
    assert nbytes == count * 4


def test_adamw_state_bytes_match_the_fused_optimiser():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randn(4, 7)).square().sum().backward()
    optimizer.step()
    count = sum(p.numel() for p in model.parameters())
    assert adamw_state_bytes(model.parameters()) == 2 * 4 * count + 4 * 5  # 5 tensors, one step counter each
    assert measured_state_bytes(optimizer, list(model.parameters())) == adamw_state_bytes(model.parameters())


def test_saved_tensor_bytes_of_a_linear_layer():
    layer = nn.Linear(16, 8)
    x = torch.randn(10, 16, requires_grad=True)
    with SavedTensorBytes(layer.parameters()) as counter:
        y = torch.relu(layer(x))
    # linear saves its input (and the weight, a parameter: not counted); relu saves its output
    assert counter.total == 10 * 16 * 4 + 10 * 8 * 4
    del y


def test_gpu_estimate_exact_terms_glint360k_vit_l():
    cfg = get_config(os.path.join(ROOT, "configs", "glint360k_vit_l.py"))
    with torch.device("meta"):
        count, nbytes = param_stats(get_model(cfg.network))
    zero = {"peak_fixed": 0, "peak_per_sample": 0}
    rows, terms = gpu_estimate(cfg, (count, nbytes), zero, {"fixed": 0, "per_global_sample": 0})
    assert rows == 45029
    assert terms["weights"] == terms["grads"] == terms["ddp_buckets"] == count * 4
    assert terms["adamw"] == 8 * count
    assert terms["fc_shard"] == terms["fc_grad"] == 45029 * 2048 and terms["fc_adamw"] == 2 * 45029 * 2048
    assert terms["activations"] == terms["head_activations"] == 0
    assert terms["total"] == 20 * count + 4 * 45029 * 2048 + terms["temporaries"]


def test_gpu_estimate_wf42m_samples_30_percent_of_the_shard():
    """WebFace42M on 8 GPUs: the whole shard is state (weights, gradient, AdamW), the logits cover the sampled 30%."""
    cfg = get_config(os.path.join(ROOT, "configs", "wf42m_vit_s.py"))
    assert fc_shard(cfg.num_classes, 8) == (257489, 257489 * 2048)  # 2,059,906 = 8 x 257,488 + 2
    assert sampled_rows(cfg) == int(0.3 * 257489) == 77246
    zero = {"peak_fixed": 0, "peak_per_sample": 0}
    rows, terms = gpu_estimate(cfg, (0, 0), zero, {"fixed": 0, "per_global_sample": 0})
    assert rows == 257489 and terms["fc_adamw"] == 2 * 257489 * 2048
    assert terms["temporaries"] == 3 * 4 * 77246 * 384 * 8 + 4 * 257489 * 2048
