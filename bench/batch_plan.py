"""batch_size / gradient_acc that keep each released config's total batch on 1, 2, 4 or 8 GPUs of 24, 40 and 80 GB,
from docs/memory.md's per-GPU model (bench/scale.py's gpu_estimate). Prints the table of docs/training.md.

    python bench/batch_plan.py

The total batch is the config's reference_batch (the released 8 GPUs x batch_size). For each GPU count the plan is
the largest per-GPU batch (fewest accumulation steps: gradient_acc = 1, 2, 4, ...) whose estimate plus the 2 GiB
allowance fits the card. Backbone activations are counted on the CPU as bench/scale.py does; the Partial FC head's
saves follow memory.md's per-centre model (head_model).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from backbones import get_model  # noqa: E402
from bench.scale import RELEASED, activation_profile, gpu_estimate, param_stats, sampled_rows  # noqa: E402
from utils.utils_config import get_config  # noqa: E402

GIB = 2**30
GPU_COUNTS = (1, 2, 4, 8)
CARDS = {"24 GB": 23.6 * GIB, "40 GB": 39.4 * GIB, "80 GB": 79.0 * GIB}  # usable memory (docs/memory.md)
ALLOWANCE = 2 * GIB  # CUDA context, workspaces, NCCL buffers, allocator slack (docs/memory.md)
AMP = torch.bfloat16  # saves the same 2-byte tensors as the released fp16 autocast (docs/memory.md)


def head_model(embedding_size=512):
    """-> function num_local -> head profile, docs/memory.md's model of the Partial FC head's saves: ~8 bytes per
    logit element (the fp32 softmax probabilities and the clamped cosines the margin needs) and the half-precision
    copy of the normalised shard. Written out rather than counted again for every shard size: the counted figures
    of memory.md are within 1.5 % of it."""
    def at(num_local):
        return {"per_global_sample": 8 * num_local, "fixed": 2 * embedding_size * num_local}
    return at


def plan(cfg, world_size, usable, params, profile, head_at):
    """-> (batch_size, gradient_acc, estimated bytes) keeping cfg.reference_batch on `world_size` GPUs with `usable`
    bytes each: the fewest accumulation steps that fit with the allowance; None when even batch 1 does not fit."""
    total = cfg.reference_batch
    rows = sampled_rows(cfg, world_size)  # the head's saves cover the sampled centres of the rank-0 shard
    acc = 1
    while total % (world_size * acc) == 0:
        batch = total // (world_size * acc)
        _, terms = gpu_estimate(cfg, params, profile, head_at(rows), world_size=world_size, batch_size=batch)
        if terms["total"] + ALLOWANCE <= usable:
            return batch, acc, terms["total"]
        acc *= 2
    return None


def cell(result):
    return "does not fit" if result is None else f"{result[0]} / {result[1]}"


def table(configs=RELEASED):
    """Markdown rows: config, total batch, GPUs, then batch_size / gradient_acc per card."""
    head_at = head_model()
    profiles, lines = {}, []
    cards = [f"{name}: batch_size / gradient_acc" if i == 0 else name for i, name in enumerate(CARDS)]
    lines.append("| config | total batch | GPUs | " + " | ".join(cards) + " |")
    lines.append("|---|---|---|" + "---|" * len(CARDS))
    for path in configs:
        cfg = get_config(path)
        if cfg.network not in profiles:
            profiles[cfg.network] = activation_profile(cfg.network, AMP)
        with torch.device("meta"):
            params = param_stats(get_model(cfg.network, num_features=cfg.embedding_size))
        for world in GPU_COUNTS:
            cells = [cell(plan(cfg, world, usable, params, profiles[cfg.network], head_at))
                     for usable in CARDS.values()]
            lines.append(f"| {os.path.splitext(os.path.basename(path))[0]} | {cfg.reference_batch} | {world} | "
                         + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=RELEASED)
    args = parser.parse_args()
    print("\n".join(table(args.configs)))


if __name__ == "__main__":
    main()
