"""Packing rate and peak memory of tools/make_rec.py on a WebFace-like folder of synthetic 112x112 JPEGs.

    python bench/make_rec.py [--images 1000000] [--per-id 20] [--workers N] [--data DIR]

Writes --images JPEG files, --per-id per identity folder (WebFace42M averages 20.6), into a temporary folder (or
DIR, kept and reused if it already holds them; create it beforehand in a separate, unlocked step with
--generate-only), packs them with tools/make_rec.make_rec in a child process while sampling the resident memory of
that process and of its workers from /proc every 0.2 s, deletes what it wrote and prints the rate per phase, the
rate per core and the peak memory. The images are 64 shifted crops of scikit-image's astronaut photo, JPEG quality
95 (~6 KiB, like insightface's crops), so decoding costs what a real face crop costs.
"""
import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import skimage.data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.make_rec import make_rec  # noqa: E402

MIB = 2**20


def face_jpegs(count=64):
    face = cv2.cvtColor(skimage.data.astronaut()[0:260, 120:380], cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, 40, 2)
        img = cv2.resize(face[y:y + 220, x:x + 220], (112, 112), interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return out


def generate(root, images, per_id):
    """root/<identity>/<i>.jpg; a marker file says the folder is complete."""
    marker = os.path.join(root, ".complete")  # a file: make_rec only reads the sub-folders
    if os.path.exists(marker):
        return
    jpegs = face_jpegs()
    t0 = time.perf_counter()
    for c in range(-(-images // per_id)):
        folder = os.path.join(root, f"{c:07d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(c * per_id, min((c + 1) * per_id, images)):
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(jpegs[i % len(jpegs)])
    open(marker, "w").close()
    print(f"generated {images} files in {time.perf_counter() - t0:.0f} s", flush=True)


def rss_tree(pid):
    """{pid: resident bytes} of a process and its children (the pool workers)."""
    out = {}
    try:
        with open(f"/proc/{pid}/statm") as f:
            out[pid] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return out
    for child in children:
        out.update(rss_tree(child))
    return out


def pack(src, out, workers, conn):
    conn.send(make_rec(src, out, workers=workers))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--per-id", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--data", default=None, help="folder for the images, kept (default: a temporary one)")
    parser.add_argument("--generate-only", action="store_true", help="write the images to --data and stop")
    args = parser.parse_args()
    if args.generate_only and args.data is None:
        parser.error("--generate-only needs --data (the temporary folder is deleted at the end)")

    tmp = tempfile.mkdtemp(prefix="make_rec_bench_")
    src = args.data or os.path.join(tmp, "src")
    try:
        generate(src, args.images, args.per_id)
        if args.generate_only:
            return
        out = os.path.join(tmp, "out")
        parent, child = mp.Pipe()
        t0 = time.perf_counter()
        proc = mp.get_context("fork").Process(target=pack, args=(src, out, args.workers, child))
        proc.start()
        peak_parent = peak_worker = peak_sum = 0
        while proc.is_alive() and not parent.poll():
            rss = rss_tree(proc.pid)
            peak_sum = max(peak_sum, sum(rss.values()))
            peak_parent = max(peak_parent, rss.pop(proc.pid, 0))
            peak_worker = max([peak_worker, *rss.values()])
            time.sleep(0.2)
        num_images, num_ids, stats = parent.recv()
        wall = time.perf_counter() - t0
        proc.join()
        rec_bytes = os.path.getsize(os.path.join(out, "train.rec"))
    finally:
        shutil.rmtree(tmp)

    encode_rate = num_images / stats["encode_s"]
    print(f"{num_images} images of {num_ids} identities, {args.workers} workers, {os.cpu_count()} cores, "
          f"train.rec {rec_bytes / num_images:.0f} bytes/image")
    print(f"wall {wall:.1f} s: list {stats['list_s']:.1f} s, encode {stats['encode_s']:.1f} s, "
          f"merge {stats['merge_s']:.1f} s")
    print(f"encode: {encode_rate:.0f} images/s, {encode_rate / args.workers:.0f} images/s per worker; "
          f"list: {num_images / stats['list_s']:.0f} images/s; merge: {num_images / stats['merge_s']:.0f} images/s")
    print(f"peak RSS: parent {peak_parent / MIB:.0f} MiB, largest worker {peak_worker / MIB:.0f} MiB, "
          f"all together {peak_sum / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
