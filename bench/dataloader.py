"""Images/s of the RecordIO training loader (read + JPEG decode + flip + normalize + collate) on CPU.

    python bench/dataloader.py [--images 4096] [--batch-size 64] [--workers 1 2] [--repeats 5]

Packs a temporary .rec of 112x112 face crops (scikit-image's astronaut photo, shifted per image, JPEG quality 95
like insightface), then times full epochs through dataset.get_dataloader for each worker count and prints the
median over repeats. Worker start-up is included (it is paid every epoch).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import skimage.data
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import get_dataloader  # noqa: E402
from utils.recordio import IRHeader, IndexedRecordWriter, encode_image, pack_header  # noqa: E402


def write_rec(root, num_images, num_ids=16):
    face = cv2.cvtColor(skimage.data.astronaut()[0:260, 120:380], cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(0)
    a, b = 1 + num_images, 1 + num_images + num_ids
    per_id = -(-num_images // num_ids)
    with IndexedRecordWriter(os.path.join(root, "train.rec"), os.path.join(root, "train.idx")) as w:
        w.write_idx(0, pack_header(IRHeader(0, [a, b], 0, 1)))
        for i in range(num_images):
            y, x = rng.integers(0, 40, 2)
            img = cv2.resize(face[y:y + 220, x:x + 220], (112, 112), interpolation=cv2.INTER_AREA)
            w.write_idx(i + 1, pack_header(IRHeader(0, float(i // per_id), i + 1, 0), encode_image(img, 95)))
        for c in range(num_ids):
            w.write_idx(a + c, pack_header(IRHeader(0, [1 + c * per_id, min(1 + (c + 1) * per_id, a)], 0, 0)))


def images_per_second(root, batch_size, workers, repeats):
    loader = get_dataloader(root, 0, batch_size, num_workers=workers)
    rates = []
    for epoch in range(repeats):
        loader.sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; workers do the decoding
    with tempfile.TemporaryDirectory() as root:
        write_rec(root, args.images)
        size = os.path.getsize(os.path.join(root, "train.rec")) / args.images
        print(f"{args.images} images, {size / 1024:.1f} KiB/record, batch {args.batch_size}, "
              f"median of {args.repeats} epochs, {os.cpu_count()} CPUs")
        print("| workers | images/s |")
        print("|---|---|")
        for workers in args.workers:
            print(f"| {workers} | {images_per_second(root, args.batch_size, workers, args.repeats):.0f} |")


if __name__ == "__main__":
    main()
