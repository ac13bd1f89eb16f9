"""Bytes written and training stall per checkpoint save (docs/memory.md, "Checkpoint size and save stall").

    python bench/checkpoint.py                                   # sizes of the six released configs + rehearsal
    python bench/checkpoint.py --rehearse configs/ms1mv2_vit_l.py --repeats 3

1. Sizes, exact and without training: for each example config for 8 GPUs (released and WebFace), on 8 ranks, the tensor bytes of one save. A set
   writes the backbone's fp32 weights and buffers, its AdamW moments (exp_avg, exp_avg_sq) and step counters once
   (shared.pt), and per rank the Partial FC shard with its two moments (rank_<r>.pt); the single-file layout of
   earlier versions wrote the backbone part on every rank. Parameter counts come from the network built on the meta
   device (no memory).
2. Rehearsal on CPU, rank 0 of 8 (the rank with the most to write): the config's real backbone and its real
   rank-0 Partial FC shard, AdamW state after one step, saved by utils.resume.save_state. Timed: the stall of the
   training thread with the background writer (copy to host memory + hand-off), the write that follows, a blocking
   save for comparison, and torch.distributed.checkpoint.async_save of the same tensors (its stall and its write).
   Bytes on disk (from the completion marker) are printed next to the exact count.

Then the GPU projection: stall = bytes rank 0 copies to host / device-to-host bandwidth, write = bytes / disk
bandwidth (both stated as assumptions in the output).
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from backbones import get_model  # noqa: E402
from partial_fc import class_range  # noqa: E402
from utils import checkpoint_set  # noqa: E402
from utils.background import BackgroundJob  # noqa: E402
from utils.distributed import DistEnv  # noqa: E402
from utils.resume import save_state  # noqa: E402
from utils.utils_config import get_config  # noqa: E402

# the example configs for 8 GPUs: the six released ones, then the WebFace ones
CONFIGS = [os.path.join(ROOT, "configs", f"{data}_vit_{size}.py")
           for data in ("ms1mv2", "glint360k", "wf4m", "wf12m", "wf42m") for size in "sbl"]
WORLD = 8
GB = 1e9


def set_bytes(cfg, world_size=WORLD):
    """Exact tensor bytes of one save -> dict(shared, rank0, total, single_file_total). AdamW: two fp32 moments per
    parameter and a float32 step counter per parameter tensor (fused); RNG states and metadata (a few KiB) aside."""
    with torch.device("meta"):
        backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs)
    params = list(backbone.parameters())
    weights = sum(p.numel() * 4 for p in params)
    buffers = sum(b.numel() * b.element_size() for b in backbone.buffers())
    shared = 3 * weights + 4 * len(params) + buffers
    shards = [class_range(cfg.num_classes, r, world_size)[1] * cfg.embedding_size * 4 * 3 + 4
              for r in range(world_size)]
    return {"params": sum(p.numel() for p in params), "shared": shared, "rank0": shards[0],
            "total": shared + sum(shards), "single_file_total": world_size * shared + sum(shards)}


def rank0_state(cfg):
    """The real backbone and rank 0's real Partial FC shard (8 ranks), with AdamW state after one (zero-gradient)
    step, as train.build_optimizer builds it."""
    backbone = get_model(cfg.network, num_features=cfg.embedding_size, **cfg.network_kwargs)
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(torch.zeros(class_range(cfg.num_classes, 0, WORLD)[1], cfg.embedding_size))
    cfg.optimizer = "adamw"
    optimizer = train.build_optimizer(cfg, backbone, head)
    for p in list(backbone.parameters()) + [head.weight]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = train.PolyScheduler(optimizer, cfg.lr, 1000, 10)
    return backbone, head, optimizer, scheduler


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rehearse(cfg_path, repeats):
    cfg = get_config(cfg_path)
    modules = rank0_state(cfg)
    env = DistEnv(rank=0, local_rank=0, world_size=WORLD, device=torch.device("cpu"))
    rows = {"stall (background writer)": [], "write after the stall": [], "blocking save": [],
            "stall (dcp.async_save)": [], "dcp write after the stall": []}
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR"))
    written = 0
    try:
        cfg.output = root
        job = BackgroundJob()
        for i in range(repeats):
            stall, _ = timed(lambda: save_state(cfg, env, *modules, None, 0, 1, 2 * i + 1, job=job))
            write, _ = timed(job.wait)
            rows["stall (background writer)"].append(stall)
            rows["write after the stall"].append(write)
            blocking, _ = timed(lambda: save_state(cfg, env, *modules, None, 0, 1, 2 * i + 2))
            rows["blocking save"].append(blocking)
            folder = checkpoint_set.set_dir(root, 2 * i + 2)
            written = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
            stall, write = dcp_save(modules, os.path.join(root, f"dcp_{i}"))
            rows["stall (dcp.async_save)"].append(stall)
            rows["dcp write after the stall"].append(write)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return cfg, {k: statistics.median(v) for k, v in rows.items() if v}, written


def dcp_save(modules, folder):
    """torch.distributed.checkpoint.async_save of rank 0's tensors (no process group). -> (stall, write) seconds,
    or (nan, nan) when this torch cannot do it."""
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return float("nan"), float("nan")
    backbone, head, optimizer, _ = modules
    state = {"backbone": backbone.state_dict(), "head": head.state_dict(),
             "moments": {f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}}
    try:
        stall, future = timed(lambda: dcp.async_save(state, checkpoint_id=folder, no_dist=True))
        write, _ = timed(future.result)
    except Exception as error:  # an API this torch does not offer
        print(f"  dcp.async_save unavailable: {type(error).__name__}: {str(error)[:120]}")
        return float("nan"), float("nan")
    return stall, write


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", nargs="*", default=[os.path.join(ROOT, "configs", "ms1mv2_vit_s.py")],
                        help="configs to rehearse on CPU (default: ms1mv2_vit_s); none: sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--d2h-gbps", type=float, default=10.0, help="assumed device-to-host copy GB/s (projection)")
    parser.add_argument("--disk-gbps", type=float, default=1.0, help="assumed disk write GB/s (projection)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    print(f"Bytes per save on {WORLD} ranks (exact tensor bytes, GB = 1e9 B); projection at {args.d2h_gbps:g} GB/s "
          f"device-to-host and {args.disk_gbps:g} GB/s disk")
    print("| config | backbone params | shared.pt (once) | rank-0 shard file | set, all ranks | single files, all "
          "ranks (before) | GPU stall rank 0 | background write | blocking write before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in CONFIGS:
        cfg = get_config(path)
        b = set_bytes(cfg)
        rank0 = b["shared"] + b["rank0"]
        print(f"| {os.path.basename(path)[:-3]} | {b['params'] / 1e6:.1f} M | {b['shared'] / GB:.2f} GB | "
              f"{b['rank0'] / GB:.3f} GB | {b['total'] / GB:.2f} GB | {b['single_file_total'] / GB:.1f} GB | "
              f"{rank0 / GB / args.d2h_gbps:.2f} s | {b['total'] / GB / args.disk_gbps:.1f} s | "
              f"{b['single_file_total'] / GB / args.disk_gbps:.1f} s |")

    for path in args.rehearse:
        cfg, times, written = rehearse(path, args.repeats)
        b = set_bytes(cfg)
        print(f"\nCPU rehearsal, rank 0 of {WORLD}: {os.path.basename(path)} ({platform.processor() or 'cpu'}, "
              f"torch {torch.__version__}, {args.repeats} saves, medians)")
        print(f"  bytes on disk: {written / GB:.3f} GB (exact tensor bytes: {(b['shared'] + b['rank0']) / GB:.3f} GB)")
        for name, seconds in times.items():
            print(f"  {name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
