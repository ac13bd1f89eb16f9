"""The WebFace4M/12M/42M job configs: arcface_torch's WebFace ViT recipe and the schedule it gives on 8 GPUs."""
import os

import pytest

from train import count_steps
from utils.utils_config import get_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NETWORKS = {"s": "vit_s_dp005_mask_0", "b": "vit_b_dp005_mask_005", "l": "vit_l_dp005_mask_005"}
# data: (identities, images, {size: (per-GPU batch, gradient_acc)}, optimiser steps per epoch on 8 GPUs)
DATA = {
    "wf4m": (205990, 4235242, {"s": (512, 1), "b": (512, 1), "l": (512, 1)}, 1033),
    "wf12m": (617970, 12720066, {"s": (512, 1), "b": (512, 1), "l": (512, 1)}, 3105),
    "wf42m": (2059906, 42474557, {"s": (384, 8), "b": (256, 12), "l": (384, 8)}, 1728),
}
CASES = [(data, size) for data in DATA for size in "sbl"]


@pytest.mark.parametrize("data, size", CASES)
def test_webface_config(data, size):
    cfg = get_config(os.path.join(CONFIG_DIR, f"{data}_vit_{size}.py"))
    classes, images, batches, steps = DATA[data]
    batch, acc = batches[size]
    assert (cfg.network, cfg.num_classes, cfg.num_image) == (NETWORKS[size], classes, images)
    assert tuple(cfg.margin_list) == (1.0, 0.0, 0.4)  # CosFace m 0.4
    assert (cfg.sample_rate, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.embedding_size) == (0.3, "adamw", 1e-3,
                                                                                            0.1, 512)
    assert (cfg.batch_size, cfg.gradient_acc, cfg.num_epoch, cfg.warmup_epoch) == (batch, acc, 40, 4)
    assert (cfg.amp, cfg.dpap, cfg.ehsm) == ("fp16", True, True)
    assert cfg.output == os.path.join("work_dirs", f"{data}_vit_{size}")
    # the schedule train.py derives on 8 GPUs: optimiser steps per epoch, total and warm-up
    per_epoch = count_steps(cfg, loader_len=10**9, world_size=8)
    assert per_epoch == steps == images // (batch * 8) // acc
    assert (per_epoch * cfg.num_epoch, per_epoch * cfg.warmup_epoch) == (40 * steps, 4 * steps)


def test_wf42m_global_batch_is_arcface_torchs():
    """All three WebFace42M configs step with arcface_torch's global batch of 24576 (384 x 64 GPUs), so the 8-GPU
    schedule equals that of its 64-GPU runs without accumulation."""
    for size in "sbl":
        cfg = get_config(os.path.join(CONFIG_DIR, f"wf42m_vit_{size}.py"))
        assert cfg.batch_size * 8 * cfg.gradient_acc == 384 * 64 == 24576
        assert count_steps(cfg, 10**9, 8) == 42474557 // 24576 == 1728
