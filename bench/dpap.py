"""Images/s of dpap() vs a release-style numpy loop, batch of 128 112x112 images, random patch weights.

    python bench/dpap.py [--batch-size 128] [--repeats 20] [--probs 0.2 1.0] [--threads 1]

dpap() is timed on CPU and, when available, on CUDA (synchronised). The reference is a per-image, per-patch
numpy loop in the style of the released code (de-normalise to NHWC [0,255], np.fft per patch with the
fftshift/centre-crop/ifftshift amplitude mix at ratio 1, uint8 truncation, re-normalise), on CPU only and
without the GPU<->CPU copies the release also pays. Median over repeats.
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpap import dpap  # noqa: E402


def release_style(images, patch_weights, rng, top_k=7, prob=0.2, patch_size=9, alpha=1.0, ratio=1.0):
    p = patch_size
    x = ((images.numpy() * 0.5 + 0.5) * 255).transpose(0, 2, 3, 1).copy()  # NHWC in [0, 255]
    b, h, w, _ = x.shape
    gh, gw = h // p, w // p
    top = np.argsort(-patch_weights.numpy(), axis=1)[:, :top_k]
    crop = int(p * math.sqrt(ratio))
    lo = (p - crop) // 2
    centre = (slice(lo, lo + crop), slice(lo, lo + crop))
    for i in range(b):
        if rng.uniform() > prob:
            continue
        for t in top[i]:
            r, c = divmod(int(t), gw)
            j, pr, pc = rng.integers(b), rng.integers(gh), rng.integers(gw)
            lam = rng.uniform(0, alpha)
            src = x[i, r * p:(r + 1) * p, c * p:(c + 1) * p]
            partner = x[j, pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]  # sequential: may already be modified
            fs = np.fft.fft2(src, axes=(0, 1))
            amp_s = np.fft.fftshift(np.abs(fs), axes=(0, 1))
            amp_q = np.fft.fftshift(np.abs(np.fft.fft2(partner, axes=(0, 1))), axes=(0, 1))
            amp_s[centre] = lam * amp_q[centre] + (1 - lam) * amp_s[centre]
            amp = np.fft.ifftshift(amp_s, axes=(0, 1))
            out = np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(fs)), axes=(0, 1)))
            x[i, r * p:(r + 1) * p, c * p:(c + 1) * p] = np.clip(out, 0, 255).astype(np.uint8)
    return torch.from_numpy((x / 255 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def median_seconds(fn, repeats, sync=lambda: None):
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--probs", type=float, nargs="+", default=[0.2, 1.0])
    # the numpy loop is single-threaded; one torch thread keeps the comparison fair and avoids OpenMP
    # spin-waiting on a shared machine
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = args.batch_size
    u8 = torch.randint(0, 256, (b, 3, 112, 112), dtype=torch.uint8)
    images = (u8.float() / 255 - 0.5) / 0.5
    weights = torch.rand(b, (112 // 9) ** 2)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} CPU threads, batch {b}")
    for prob in args.probs:
        g = torch.Generator().manual_seed(0)
        t_cpu = median_seconds(lambda: dpap(images, weights, prob=prob, generator=g), args.repeats)
        rng = np.random.default_rng(0)
        t_ref = median_seconds(lambda: release_style(images, weights, rng, prob=prob), max(3, args.repeats // 4))
        line = (f"prob {prob}: dpap cpu {b / t_cpu:9.0f} img/s | release-style numpy loop {b / t_ref:7.0f} img/s"
                f" | speed-up {t_ref / t_cpu:5.1f}x")
        if torch.cuda.is_available():
            ic, wc = images.cuda(), weights.cuda()
            gc = torch.Generator("cuda").manual_seed(0)
            t_gpu = median_seconds(lambda: dpap(ic, wc, prob=prob, generator=gc), args.repeats,
                                   torch.cuda.synchronize)
            line += f" | dpap cuda {b / t_gpu:9.0f} img/s ({t_ref / t_gpu:.0f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
