"""Time one TransFace training step and its parts (docs/method.md, the training step) on one device, no process group.

    python bench/train_step.py                       # vit_t and vit_s, batch 32, CPU or the first CUDA device
    python bench/train_step.py --networks vit_s --batch-size 128 --steps 20 --amp bf16
    python bench/train_step.py --amp bf16 --attention float32 autocast --no-compile   # the attention core's dtype

Every network is timed eager and under torch.compile (the backbone compiled in place, as config.compile does;
compilation happens in the warm-up steps and is not timed), for each --attention precision (backbones/vit.py).

Parts, each closed by a device synchronisation (so the sum is a little slower than the real, unsynchronised step):
  nograd_fwd  the no-grad forward that yields the patch weights
  dpap        the perturbation of the batch
  backbone    forward with grad + backward of the backbone
  partial_fc  EHSM weights + Partial FC forward and backward (the loss head, full softmax over --num-classes)
  optimizer   unscale/clip + AdamW step + zero_grad + LR step
On CUDA the model FLOPs of a step (FlopCounterMode: one no-grad forward + forward/backward) give the MFU against the
device's dense bf16 peak, when the device is one this script knows.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbones import get_model  # noqa: E402
from backbones.vit import ATTENTION_PRECISIONS  # noqa: E402
from dpap import dpap  # noqa: E402
from losses import CombinedMarginLoss, ehsm_weights  # noqa: E402
from lr_scheduler import PolyScheduler  # noqa: E402
from partial_fc import PartialFC  # noqa: E402
from utils.amp import AMP_DTYPES, resolve_amp  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
PARTS = ("nograd_fwd", "dpap", "backbone", "partial_fc", "optimizer")


def peak_tflops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def step_parts(backbone, head, optimizer, scheduler, images, labels, autocast, sync):
    times = {}
    t = time.perf_counter()

    def mark(name):
        nonlocal t
        sync()
        now = time.perf_counter()
        times[name] = now - t
        t = now

    with torch.no_grad(), torch.autocast(**autocast):
        _, patch_weights, _ = backbone(images, return_aux=True)
    mark("nograd_fwd")
    images = dpap(images, patch_weights.float(), patch_size=backbone.patch_size)
    mark("dpap")
    with torch.autocast(**autocast):
        embeddings, _, entropy = backbone(images, return_aux=True)
    mark("backbone_fwd")
    detached = embeddings.detach().requires_grad_()
    loss = head(detached, labels, ehsm_weights(entropy.float()))
    loss.backward()
    mark("partial_fc")
    embeddings.backward(detached.grad)
    mark("backbone_bwd")
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    mark("optimizer")
    times["backbone"] = times.pop("backbone_fwd") + times.pop("backbone_bwd")
    return times


def step_flops(backbone, images):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            backbone(images, return_aux=True)
        backbone(images, return_aux=True)[0].float().sum().backward()
    backbone.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench(name, args, device, attention, compiled):
    torch.manual_seed(0)
    backbone = get_model(name, attention_precision=attention).to(device).train()
    if compiled:
        backbone.compile()
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 512, args.num_classes).to(device).train()
    optimizer = torch.optim.AdamW([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=1e-3)
    scheduler = PolyScheduler(optimizer, 1e-3, 10**6, 10)
    images = torch.rand(args.batch_size, 3, 112, 112, device=device) * 2 - 1
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    dtype = AMP_DTYPES[args.amp]
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype is not None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step_parts(backbone, head, optimizer, scheduler, images, labels, autocast, sync)
    runs = [step_parts(backbone, head, optimizer, scheduler, images, labels, autocast, sync)
            for _ in range(args.steps)]
    parts = {p: statistics.median(r[p] for r in runs) for p in PARTS}
    total = statistics.median(sum(r.values()) for r in runs)
    row = {"network": name, "attention": attention, "compiled": compiled, "samples_per_s": args.batch_size / total, "step_ms": total * 1e3,
           **{p + "_ms": v * 1e3 for p, v in parts.items()}}
    if device.type == "cuda":
        peak = peak_tflops(device)
        achieved = step_flops(backbone, images) / total / 1e12
        row["model_tflops"] = achieved
        row["mfu"] = achieved / peak if peak else None
    return row


def fmt(value):
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["vit_t", "vit_s"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", choices=["auto", "bf16", "none"], default=None,
                        help="default: bf16 on CUDA, none on CPU; auto as in the configs (utils/amp.py)")
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=list(ATTENTION_PRECISIONS),
                        help="attention core precision(s) to time")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each network under torch.compile (default on)")
    parser.add_argument("--cpu", action="store_true", help="ignore CUDA")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" else "none"
    args.amp = resolve_amp(args.amp, device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, amp {args.amp}, torch {torch.__version__}")
    header = ["network", "attention", "compiled", "samples_per_s", "step_ms", *(p + "_ms" for p in PARTS)]
    if device.type == "cuda":
        header += ["model_tflops", "mfu"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.networks:
        for attention in args.attention:
            for compiled in (False, True) if args.compile else (False,):
                row = bench(name, args, device, attention, compiled)
                print("| " + " | ".join(fmt(row[h]) for h in header) + " |", flush=True)


if __name__ == "__main__":
    main()
