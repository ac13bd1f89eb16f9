"""Scale rehearsal of the released job configs on CPU: does a config fit a GPU, before renting one?

    nice -n 19 python bench/scale.py                                   # the six released configs
    nice -n 19 python bench/scale.py --configs configs/glint360k_vit_s.py --ranks 2 --steps 2 --batch-size 2
    python bench/scale.py --skip-rehearsal                             # only the activation count + GPU table

Two parts (docs/memory.md explains how they combine):

1. Rehearsal. Each config runs `--steps` training steps at its REAL class count and REAL network on `--ranks` gloo
   ranks (127.0.0.1) with synthetic images and labels in memory: the training components of train.py (get_model,
   DDP with train.py's arguments, PartialFC with CombinedMarginLoss, DPAP's no-grad forward, EHSM weights, fused
   AdamW with the Partial FC head in its own group, PolyScheduler, grad clipping, the device-side found_inf) and the
   config's switches; fp16 becomes bf16 autocast on CPU, as train.py does. Per rank: parameters, optimiser state,
   the Partial FC shard and its optimiser state, the peak RSS, and the peak private (anonymous) RSS the parent
   samples twice a second; the parent kills the run if the ranks' private RSS together exceeds --max-rss-gb (or
   what the machine has available less 2 GiB).
2. Activation count (one process). The bytes autograd saves for backward (saved-tensor hooks, each storage counted
   once, parameters not counted) for the backbone at two batch sizes, and for the Partial FC head at the real shard
   size of 8 ranks; the difference gives bytes per sample. Exact and device-independent, unlike RSS.

Then the per-GPU estimate for 8 GPUs at batch 128 and at the config's batch size, with fp16 autocast (the CPU's
bf16 autocast saves the same bytes, docs/memory.md).
"""
import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from backbones import get_model  # noqa: E402
import train  # noqa: E402
from losses import CombinedMarginLoss, ehsm_weights  # noqa: E402
from lr_scheduler import PolyScheduler  # noqa: E402
from partial_fc import PartialFC, class_range  # noqa: E402
from utils.amp import AMP_DTYPES, resolve_amp  # noqa: E402
from utils.distributed import DistEnv, wrap_ddp  # noqa: E402
from utils.utils_config import get_config  # noqa: E402

RELEASED = [os.path.join(ROOT, "configs", f"{data}_vit_{size}.py") for data in ("ms1mv2", "glint360k")
            for size in "sbl"]
# Ranks that fit ~18 GiB of private RSS at per-rank batch 2 (measured, bench/README.md): the parameters, their
# gradients, the DDP buckets and the AdamW state (5x the fp32 weights) and ~0.4 GiB of torch are paid on every rank.
DEFAULT_RANKS = {"vit_s": 4, "vit_b": 3, "vit_l": 2}
GPU_WORLD = 8  # the released setups: 8 GPUs
GIB = 2**30


# --- exact accounting (pure functions; tests/test_scale.py) ---

def param_stats(module):
    """(number of parameters, their bytes)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def fc_shard(num_classes, world_size, rank=0, embedding_size=512, dtype_bytes=4):
    """(rows, bytes) of the Partial FC shard of `rank`; rank 0 is the largest (it gets one of the C mod W extras)."""
    rows = class_range(num_classes, rank, world_size)[1]
    return rows, rows * embedding_size * dtype_bytes


def sampled_rows(cfg, world_size=GPU_WORLD):
    """Centres of the rank-0 shard that enter the softmax each step: PartialFC.num_sample (all at sample_rate 1)."""
    return max(1, int(cfg.sample_rate * fc_shard(cfg.num_classes, world_size)[0]))


def adamw_state_bytes(params):
    """AdamW state of `params`: exp_avg and exp_avg_sq (each the size of the parameter) and the step counter (a
    float32 scalar tensor per parameter in the fused implementation). A parameter that never gets a gradient (the
    mask token of a ViT without masking) gets no state, so a real run can hold a few KiB less."""
    params = list(params)
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def measured_state_bytes(optimizer, params):
    """Bytes of the tensors the optimiser actually holds for `params`."""
    return sum(v.numel() * v.element_size() for p in params for v in optimizer.state.get(p, {}).values()
               if torch.is_tensor(v))


class SavedTensorBytes:
    """Counts the bytes of the tensors autograd saves for backward inside the `with` block: each storage once, the
    parameters (held anyway) not at all. `add(t)` counts a tensor kept alive by other means (checkpoint inputs).
    Outputs must stay alive until `total` is read, so no saved storage is freed and its address reused."""

    def __init__(self, params=()):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}

    def add(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self):
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def backbone_saved_bytes(model, batch_size, autocast, checkpointed):
    """(bytes held from the forward to the backward, bytes saved by one block) for a train-mode forward of `model`
    with return_aux (as with EHSM) at `batch_size`. checkpointed: the blocks run under torch.utils.checkpoint, so
    only their inputs are held, and the backward recomputes one block at a time."""
    model.train()
    model.using_checkpoint = checkpointed
    images = torch.rand(batch_size, 3, model.img_size, model.img_size) * 2 - 1
    counter = SavedTensorBytes(model.parameters())
    per_block = SavedTensorBytes(model.parameters())

    def hold_input(module, args):
        counter.add(args[0])

    def enter_block(module, args):
        per_block.__enter__()

    def exit_block(module, args, out):
        per_block.__exit__(None, None, None)

    if checkpointed:
        handles = [b.register_forward_pre_hook(hold_input) for b in model.blocks]
    else:  # the saves of the first block alone (blocks are identical)
        handles = [model.blocks[0].register_forward_pre_hook(enter_block),
                   model.blocks[0].register_forward_hook(exit_block)]
    with counter, torch.autocast(**autocast):
        out = model(images, return_aux=True)
        ehsm_weights(out[2].float())
    for h in handles:
        h.remove()
    held = sum({**counter.storages, **per_block.storages}.values())  # block 0 saved inside its own (inner) hooks
    del out
    return held, per_block.total


def head_saved_bytes(num_local, global_batch, amp_dtype, embedding_size=512):
    """Bytes the Partial FC head saves for backward on a rank that owns `num_local` centres, for a global batch."""
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), embedding_size, num_local, 1.0, amp_dtype).train()
    embeddings = torch.randn(global_batch, embedding_size, requires_grad=True)
    labels = torch.randint(0, num_local, (global_batch,))
    with SavedTensorBytes([*head.parameters(), embeddings]) as counter:
        loss = head(embeddings, labels, torch.ones(global_batch))
        total = counter.total
    del loss
    return total


def activation_profile(network, amp_dtype, batches=(2, 3)):
    """Per-sample and fixed saved bytes of `network` (fit through two batch sizes; saves are linear in the batch)."""
    torch.manual_seed(0)
    # the attention core in float32, as on CUDA (on a CPU it would follow the bf16 autocast and save less)
    model = get_model(network, attention_precision="float32")
    autocast = dict(device_type="cpu", dtype=amp_dtype, enabled=amp_dtype is not None)
    released_ckpt = model.using_checkpoint
    rows = []
    for b in batches:
        full, block = backbone_saved_bytes(model, b, autocast, checkpointed=False)
        held = backbone_saved_bytes(model, b, autocast, checkpointed=True)[0] if released_ckpt else full
        # during the backward of a checkpointed model one block's saves exist again on top of what is held
        peak = held + block if released_ckpt else full
        rows.append((b, full, held, peak))
    (b1, *v1), (b2, *v2) = rows
    slope = [(y2 - y1) / (b2 - b1) for y1, y2 in zip(v1, v2)]
    fixed = [y1 - s * b1 for y1, s in zip(v1, slope)]
    return {"network": network, "checkpointed": released_ckpt, "no_ckpt_per_sample": slope[0],
            "held_per_sample": slope[1], "peak_per_sample": slope[2], "peak_fixed": fixed[2]}


def head_profile(num_local, amp_dtype, batches=(8, 16)):
    (b1, y1), (b2, y2) = [(b, head_saved_bytes(num_local, b, amp_dtype)) for b in batches]
    slope = (y2 - y1) / (b2 - b1)
    return {"num_local": num_local, "per_global_sample": slope, "fixed": y1 - slope * b1}


def gpu_estimate(cfg, backbone_params, profile, head, world_size=GPU_WORLD, batch_size=None):
    """Per-GPU bytes of one training step of `cfg` on `world_size` GPUs at `batch_size` per GPU (default: the
    config's). Exact terms from the counts; activation terms from the saved-tensor profiles."""
    b = batch_size or cfg.batch_size
    weight = backbone_params[1]  # (count, bytes)
    rows, fc = fc_shard(cfg.num_classes, world_size, 0, cfg.embedding_size)
    sampled = sampled_rows(cfg, world_size)  # the logits and the head's saves cover the sampled centres only
    terms = {
        "weights": weight,
        "grads": weight,
        # DDP's flat all-reduce buckets (gradient_as_bucket_view=False, as in train.py); one process runs without DDP
        "ddp_buckets": weight if world_size > 1 else 0,
        "adamw": 2 * weight,
        "fc_shard": fc,
        "fc_grad": fc,
        "fc_adamw": 2 * fc,
        "activations": profile["peak_fixed"] + profile["peak_per_sample"] * b,
        "head_activations": head["fixed"] + head["per_global_sample"] * b * world_size,
        # not saved but live for a moment (an estimate, docs/memory.md): up to three fp32 (global batch x sampled)
        # logit tensors in the head, and ~4 shard-sized tensors (the fp32 normalised shard, the gradients through
        # its half-precision copy and the normalisation; the CPU rehearsal measures 3-3.6x the shard)
        "temporaries": 3 * 4 * sampled * b * world_size + 4 * fc,
    }
    terms["total"] = sum(terms.values())
    return rows, terms


# --- the rehearsal ---

def anon_rss(pid="self"):
    """Private (anonymous) resident bytes of a process: what it really adds to the machine. Plain RSS also counts
    the pages of the shared libraries (libtorch), which every rank maps from the same page cache."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)  # 0: exiting
    except (FileNotFoundError, ProcessLookupError):
        return 0


def mem_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rank_main(rank, world_size, port, cfg_path, steps, batch_size, result_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")  # train.py passes it too
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=30))
    cfg = get_config(cfg_path)
    torch.manual_seed(cfg.seed + rank)
    amp_dtype = AMP_DTYPES[resolve_amp(cfg.amp, "cpu")]  # the released fp16 -> bf16 on CPU
    autocast = dict(device_type="cpu", dtype=amp_dtype, enabled=amp_dtype is not None)
    anon_start = anon_rss()

    backbone = get_model(cfg.network, num_features=cfg.embedding_size,
                         **{"attention_precision": "float32", **cfg.network_kwargs})  # as on CUDA
    head = PartialFC(CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold),
                     cfg.embedding_size, cfg.num_classes, cfg.sample_rate, amp_dtype)
    optimizer = train.build_optimizer(cfg, backbone, head)
    head.register_optimizer(optimizer)
    scheduler = PolyScheduler(optimizer, cfg.lr, 1000, 100)
    model = wrap_ddp(backbone, DistEnv(rank, rank, world_size, torch.device("cpu")))  # train.py's DDP
    model.train()
    head.train()
    images_all = torch.rand(steps, batch_size, 3, 112, 112) * 2 - 1
    labels_all = torch.randint(0, cfg.num_classes, (steps, batch_size))

    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = [(images_all[step], labels_all[step])]
        loss, _ = train.train_step(model, head, optimizer, scheduler, None, cfg, batch, autocast)  # train.py's step
        dist.barrier()
        times.append(time.perf_counter() - t0)

    count, weight_bytes = param_stats(backbone)
    result = {
        "rank": rank, "loss": loss.item(), "params": count, "param_bytes": weight_bytes,
        "opt_bytes": measured_state_bytes(optimizer, list(backbone.parameters())),
        "fc_rows": head.num_local, "fc_bytes": head.weight.numel() * head.weight.element_size(),
        "fc_opt_bytes": measured_state_bytes(optimizer, [head.weight]),
        "anon_start": anon_start, "peak_rss": peak_rss(), "anon_end": anon_rss(), "step_s": times,
    }
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo teardown can abort after the work is done (tests/dist_utils.py)


def rehearse(cfg_path, world_size, steps, batch_size, max_rss):
    """Spawn the ranks, sample their private RSS twice a second (killing them all above `max_rss` bytes in sum),
    return (per-rank results with "peak_anon", the peak of the sum)."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as result_dir:
        procs = [ctx.Process(target=rank_main, args=(r, world_size, port, cfg_path, steps, batch_size, result_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        peak_total, peak_rank = 0, [0] * world_size
        while any(p.is_alive() for p in procs):
            anon = [anon_rss(p.pid) if p.is_alive() else 0 for p in procs]
            peak_rank = [max(a, b) for a, b in zip(anon, peak_rank)]
            peak_total = max(peak_total, sum(anon))
            if sum(anon) > max_rss or mem_available() < GIB:  # the machine is shared: never starve the others
                for p in procs:
                    p.kill()
                    p.join()
                raise MemoryError(f"{cfg_path} on {world_size} ranks: summed private RSS {sum(anon) / GIB:.1f} GiB "
                                  f"(limit {max_rss / GIB:.1f} GiB), machine has {mem_available() / GIB:.1f} GiB "
                                  "available; run it on fewer ranks (--ranks)")
            time.sleep(0.5)
        results = []
        for r, p in enumerate(procs):
            p.join()
            path = os.path.join(result_dir, f"rank{r}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"{cfg_path}: rank {r} left no result (exit code {p.exitcode})")
            with open(path) as f:
                results.append({**json.load(f), "peak_anon": peak_rank[r]})
    return results, peak_total


# --- report ---

def gib(x):
    return f"{x / GIB:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=RELEASED)
    parser.add_argument("--ranks", type=int, default=None, help="gloo ranks per config (default: by network size)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per-rank batch of the rehearsal")
    parser.add_argument("--max-rss-gb", type=float, default=18.0,
                        help="kill a rehearsal whose ranks' private RSS exceeds this (or MemAvailable - 2 GiB)")
    parser.add_argument("--skip-rehearsal", action="store_true")
    args = parser.parse_args()
    cfgs = {path: get_config(path) for path in args.configs}

    if not args.skip_rehearsal:
        # never take the memory other jobs on the machine are using: leave 2 GiB of what is available now
        limit = min(args.max_rss_gb * GIB, mem_available() - 2 * GIB)
        print(f"private RSS limit for the ranks together: {limit / GIB:.1f} GiB\n")
        print("| config | ranks | batch/rank | params | param MiB | AdamW MiB | FC rows (rank 0) | FC MiB "
              "| FC AdamW MiB | peak RSS/rank GiB | peak private/rank GiB | accounted/rank GiB | sum private GiB "
              "| s/step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        mib = 2**20
        for path, cfg in cfgs.items():
            world = args.ranks or DEFAULT_RANKS.get(cfg.network[:5], 2)
            try:
                results, peak_total = rehearse(path, world, args.steps, args.batch_size, limit)
            except MemoryError as e:  # the guard stopped it: say so and go on with the next config
                print(f"| {os.path.basename(path)} | {world} | {args.batch_size} | not run: {e} |", flush=True)
                continue
            r0 = results[0]
            # private memory at start + weights, grads, DDP buckets, AdamW (5x) + FC shard, grad, AdamW (4x)
            accounted = r0["anon_start"] + 3 * r0["param_bytes"] + r0["opt_bytes"] + 2 * r0["fc_bytes"] + \
                r0["fc_opt_bytes"]
            step_s = [max(r["step_s"][i] for r in results) for i in range(args.steps)]
            print(f"| {os.path.basename(path)} | {world} | {args.batch_size} | {r0['params']:,} "
                  f"| {r0['param_bytes'] / mib:.1f} | {r0['opt_bytes'] / mib:.1f} | {r0['fc_rows']:,} "
                  f"| {r0['fc_bytes'] / mib:.1f} | {r0['fc_opt_bytes'] / mib:.1f} "
                  f"| {gib(max(r['peak_rss'] for r in results))} | {gib(max(r['peak_anon'] for r in results))} "
                  f"| {gib(accounted)} | {gib(peak_total)} | {' / '.join(f'{t:.0f}' for t in step_s)} |", flush=True)

    amp = torch.bfloat16  # the released fp16 autocast saves the same 2-byte tensors (docs/memory.md)
    profiles = {}
    print("\n| network | checkpointed blocks | saved MiB/sample (no checkpointing) | held MiB/sample "
          "| backward peak MiB/sample | fixed MiB |")
    print("|---|---|---|---|---|---|")
    for cfg in cfgs.values():
        if cfg.network not in profiles:
            p = profiles[cfg.network] = activation_profile(cfg.network, amp)
            mib = 2**20
            print(f"| {cfg.network} | {p['checkpointed']} | {p['no_ckpt_per_sample'] / mib:.2f} "
                  f"| {p['held_per_sample'] / mib:.2f} | {p['peak_per_sample'] / mib:.2f} "
                  f"| {p['peak_fixed'] / mib:.1f} |", flush=True)
    heads = {}
    for cfg in cfgs.values():
        rows = sampled_rows(cfg)  # the head profile of a shard of the sampled size
        if rows not in heads:
            heads[rows] = head_profile(rows, amp)
            print(f"head, {rows:,} centres: {heads[rows]['per_global_sample'] / 1024:.1f} KiB per global sample, "
                  f"{heads[rows]['fixed'] / 2**20:.1f} MiB fixed", flush=True)

    print(f"\nPer-GPU estimate, {GPU_WORLD} GPUs, fp16 autocast, GiB:")
    names = ["weights", "grads", "ddp_buckets", "adamw", "fc_shard", "fc_grad", "fc_adamw", "activations",
             "head_activations", "temporaries", "total"]
    print("| config | batch/GPU | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for path, cfg in cfgs.items():
        with torch.device("meta"):
            stats = param_stats(get_model(cfg.network, num_features=cfg.embedding_size))
        for b in sorted({cfg.batch_size, 128}):
            _, terms = gpu_estimate(cfg, stats, profiles[cfg.network], heads[sampled_rows(cfg)],
                                    batch_size=b)
            print(f"| {os.path.basename(path)} | {b} | " + " | ".join(gib(terms[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
