"""docs/training.md's batch_size / gradient_acc table is what bench/batch_plan.py computes from docs/memory.md's
model, and each plan is the fewest accumulation steps that fit."""
import os
import re

import pytest
import torch

from backbones import get_model
from bench.batch_plan import ALLOWANCE, CARDS, cell, head_model, plan
from bench.scale import activation_profile, gpu_estimate, param_stats, sampled_rows
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def doc_cells():
    """{(config, GPUs): [cell per card]} of docs/training.md."""
    with open(os.path.join(REPO, "docs", "training.md")) as handle:
        text = handle.read()
    rows = re.findall(r"^\| ((?:ms1mv2|glint360k)_vit_[sbl]) \| (\d+) \| (\d+) \| (.+) \|$", text, flags=re.M)
    return {(name, int(gpus)): [c.strip() for c in cells.split("|")] for name, _, gpus, cells in rows}


def test_head_model_matches_the_counted_figures_of_memory_md():
    # docs/memory.md: 84.8 KiB per global sample and 10.5 MiB fixed at 10,718 centres (MS1MV2 on 8 GPUs),
    # 352.8 KiB and 44.3 MiB at 45,029 (Glint360K)
    head_at = head_model()
    for rows, per_sample_kib, fixed_mib in [(10718, 84.8, 10.5), (45029, 352.8, 44.3)]:
        assert head_at(rows)["per_global_sample"] / 1024 == pytest.approx(per_sample_kib, rel=0.015)
        assert head_at(rows)["fixed"] / 2**20 == pytest.approx(fixed_mib, rel=0.01)


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
