"""docs/training.md's batch_size / gradient_acc table is what bench/batch_plan.py computes from docs/memory.md's
model, and each plan is the fewest accumulation steps that fit."""
import os
import re

import pytest
import torch

from backbones import get_model
from bench.batch_plan import ALLOWANCE, CARDS, cell, head_model, plan
from bench.scale import activation_profile, fc_shard, gpu_estimate, head_profile, param_stats, sampled_rows
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def doc_cells():
    """{(config, GPUs): [cell per card]} of docs/training.md."""
    with open(os.path.join(REPO, "docs", "training.md")) as handle:
        text = handle.read()
    rows = re.findall(r"^\| ((?:ms1mv2|glint360k)_vit_[sbl]) \| (\d+) \| (\d+) \| (.+) \|$", text, flags=re.M)
    return {(name, int(gpus)): [c.strip() for c in cells.split("|")] for name, _, gpus, cells in rows}


def test_head_model_is_exact_at_a_real_shard():
    head_at = head_model()
    measured = head_profile(fc_shard(85742, 8)[0], torch.bfloat16)  # the MS1MV2 rank-0 shard on 8 GPUs
    for key in ("per_global_sample", "fixed"):
        assert head_at(10718)[key] == pytest.approx(measured[key], rel=1e-9)


def test_doc_table_cells_recomputed():
    cells = doc_cells()
    assert len(cells) == 6 * 4 and all(len(row) == 3 for row in cells.values())
    profile = activation_profile("vit_s_dp005_mask_0", torch.bfloat16)
    head_at = head_model()
    for name, world in [("ms1mv2_vit_s", 1), ("ms1mv2_vit_s", 2), ("ms1mv2_vit_s", 8), ("glint360k_vit_s", 1)]:
        cfg = get_config(os.path.join(REPO, "configs", f"{name}.py"))
        with torch.device("meta"):
            params = param_stats(get_model(cfg.network))
        computed = [cell(plan(cfg, world, usable, params, profile, head_at)) for usable in CARDS.values()]
        assert cells[(name, world)] == computed, (name, world)
        for text, usable in zip(computed, CARDS.values()):
            batch, acc = map(int, text.split(" / "))
            assert world * batch * acc == cfg.reference_batch == 8 * cfg.batch_size
            # fits with the allowance; one step fewer of accumulation (twice the batch) would not
            rows = sampled_rows(cfg, world)
            def fits(b):
                terms = gpu_estimate(cfg, params, profile, head_at(rows), world_size=world, batch_size=b)[1]
                return terms["total"] + ALLOWANCE <= usable
            assert fits(batch) and (acc == 1 or not fits(2 * batch)), (name, world, text)
