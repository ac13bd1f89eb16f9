"""Pack face images into insightface RecordIO: OUT/train.rec, OUT/train.idx, OUT/property (docs/data.md).

    python tools/make_rec.py SRC OUT [--resize] [--quality 95] [--workers N] [--shuffle] [--seed 0]

SRC is an ImageFolder tree (SRC/<identity>/<image>, labels = sorted folder order) or a list file with one
`path label` line per image (relative paths are relative to the list file; labels are integers 0..C-1).
Layout: record 0 = header [A, B]; keys 1..A-1 = images grouped by label; keys A..B-1 = one [start, end) range per
identity. With --shuffle the images are written in a seeded random order as keys 0..N-1 without header and identity
records (the im2rec layout arcface_torch's DALI reader wants). Images must be 112x112 unless --resize is given;
112x112 JPEGs are stored as they are, anything else is encoded as JPEG (quality 95, like insightface).

Built for WebFace42M on one machine (docs/data.md#packing-webface-size-folders):
1. count: the worker processes list SRC shard by shard (a shard is --ids-per-shard consecutive identities, or
   --images-per-shard lines of a list file); nobody holds a list of all image paths.
2. encode: each shard is encoded by one worker into OUT/shards/<n>.rec with <n>.npz (record offsets and labels),
   both written under temporary names and renamed, then marked done by <n>.json. A rerun after a kill skips the
   shards whose marker matches the current listing and options.
3. merge: the shard records are copied byte for byte into train.rec in the final order, each record's id field set
   to its key; the image count is checked against the count of step 1; the shards are deleted.
"""
import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402
from utils.recordio import IRHeader, RecordIOError, decode_image, encode_image, encode_record, pack_header  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SIZE = 112
ID_OFFSET = 16  # bytes from a record's start to its IRHeader id: magic, lrec, flag, label
MERGE_BLOCK = 8192  # records gathered per read/write batch of the merge


def list_identity(src, name):
    """Sorted image file names of one identity folder."""
    return sorted(e.name for e in os.scandir(os.path.join(src, name)) if e.name.lower().endswith(IMAGE_EXTENSIONS))


def parse_list_line(src, lineno, line):
    try:
        path, label = line.rsplit(None, 1)
        label = int(label)
    except ValueError:
        raise RecordIOError(f"{src}: line {lineno}: expected '<path> <label>', got {line.strip()[:80]!r}") from None
    if label < 0:
        raise RecordIOError(f"{src}: line {lineno}: negative label {label}")
    return path.strip(), label


def iter_list_chunks(src, size):
    """Chunks of `size` (path, label) pairs of a list file, read lazily (paths relative to the list file)."""
    base = os.path.dirname(os.path.abspath(src))
    chunk, lineno = [], 0
    with open(src, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    path, label = parse_list_line(src, lineno, line)
                    chunk.append((os.path.join(base, path), label))
                    if len(chunk) == size:
                        yield chunk
                        chunk = []
        except UnicodeDecodeError:
            raise RecordIOError(f"{src}: line {lineno + 1}: not UTF-8 text (expected a list file of "
                                "'<path> <label>' lines)") from None
    if chunk:
        yield chunk


def shard_samples(src, task):
    """(samples [(path, label)], digest of the listing) of a shard task: ("ids", first label, names) of an
    ImageFolder or ("list", pairs) of a list file."""
    digest = hashlib.sha1()
    if task[0] == "list":
        samples = task[1]
        for path, label in samples:
            digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
        return samples, digest.hexdigest()
    _, first, names = task
    samples = []
    for label, name in enumerate(names, first):
        files = list_identity(src, name)
        digest.update(("\n".join([name, *files]) + "\n\n").encode("utf-8", "surrogateescape"))
        samples.extend((os.path.join(src, name, f), label) for f in files)
    return samples, digest.hexdigest()


def count_shard(src, task):
    samples, digest = shard_samples(src, task)
    return len(samples), digest


def image_bytes(path, resize, quality):
    with open(path, "rb") as f:
        buf = f.read()
    img = decode_image(buf, path)
    if img.shape[:2] != (SIZE, SIZE):
        if not resize:
            raise RecordIOError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected {SIZE}x{SIZE} "
                                f"(use --resize)")
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    elif buf[:3] == b"\xff\xd8\xff":
        return buf
    return encode_image(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), quality)


def shard_paths(shard_dir, n):
    stem = os.path.join(shard_dir, f"{n:06d}")
    return stem + ".rec", stem + ".npz", stem + ".json"


def shard_done(shard_dir, n, digest, options):
    """The marker of shard n matches this listing and these options, and its files are complete."""
    rec, npz, marker = shard_paths(shard_dir, n)
    try:
        with open(marker) as f:
            done = json.load(f)
        return (done["digest"], done["options"]) == (digest, options) and os.path.getsize(rec) == done["bytes"] \
            and os.path.isfile(npz)
    except (OSError, ValueError, KeyError):
        return False


def replace_atomically(tmp, path):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_shard(src, shard_dir, n, task, digest, options):
    """Encode shard n into <n>.rec (ids 0: set by the merge) and <n>.npz (offsets, labels), then its marker."""
    samples, found = shard_samples(src, task)
    if found != digest:
        raise RecordIOError(f"{src}: the images of shard {n} changed while packing (listed again: "
                            f"{len(samples)} images); run the command again")
    rec, npz, marker = shard_paths(shard_dir, n)
    offsets = np.empty(len(samples), dtype=np.int64)
    labels = np.array([label for _, label in samples], dtype=np.int32)
    with open(rec + ".tmp", "wb") as f:
        for i, (path, label) in enumerate(samples):
            offsets[i] = f.tell()
            f.write(encode_record(pack_header(IRHeader(0, float(label), 0, 0), image_bytes(path, *options))))
        size = f.tell()
    with open(npz + ".tmp", "wb") as f:
        np.savez(f, offsets=offsets, labels=labels)
    replace_atomically(rec + ".tmp", rec)
    replace_atomically(npz + ".tmp", npz)
    with open(marker + ".tmp", "w") as f:
        json.dump({"digest": digest, "options": options, "count": len(samples), "bytes": size}, f)
    replace_atomically(marker + ".tmp", marker)
    return len(samples)


class Shards:
    """The shard tasks of SRC, generated lazily (an ImageFolder keeps only the identity names in memory)."""

    def __init__(self, src, ids_per_shard, images_per_shard):
        self.src = src
        if os.path.isdir(src):
            self.names = sorted(e.name for e in os.scandir(src) if e.is_dir())
            self.num_classes = len(self.names)
            self.ids_per_shard = ids_per_shard
        elif os.path.isfile(src):
            self.names, self.num_classes, self.images_per_shard = None, None, images_per_shard
            next(iter_list_chunks(src, 1), None)  # a file that is no list fails in one line, before any progress bar
        else:
            raise RecordIOError(f"{src}: neither an image folder nor a list file")

    def count(self):
        """Number of shards; None for a list file (known after reading it)."""
        return None if self.names is None else -(-len(self.names) // self.ids_per_shard)

    def __iter__(self):
        if self.names is None:
            yield from (("list", chunk) for chunk in iter_list_chunks(self.src, self.images_per_shard))
            return
        for first in range(0, len(self.names), self.ids_per_shard):
            yield "ids", first, self.names[first:first + self.ids_per_shard]


def call(args):
    fn, *rest = args
    return fn(*rest)


def parallel(pool, jobs, ordered=True):
    """Results of the lazy jobs [(fn, *args)] from the pool (in order or as they finish) or, pool None, from this
    process. The pool's feeder blocks while its pipe is full, so the jobs are generated as the workers take them."""
    if pool is None:
        return map(call, jobs)
    return pool.imap(call, jobs) if ordered else pool.imap_unordered(call, jobs)


class ShardRecords:
    """Where every record of the shards is, as flat arrays over the records in shard order (int32 label and shard,
    int64 offset: 16 bytes per image in the merging process)."""

    def __init__(self, shard_dir, num_shards):
        self.dir = shard_dir
        counts = []
        for n in range(num_shards):
            with np.load(shard_paths(shard_dir, n)[1]) as part:
                counts.append(part["labels"].size)
        total = sum(counts)
        self.labels = np.empty(total, dtype=np.int32)
        self.starts = np.empty(total, dtype=np.int64)
        at = 0
        for n, count in enumerate(counts):
            with np.load(shard_paths(shard_dir, n)[1]) as part:
                self.labels[at:at + count], self.starts[at:at + count] = part["labels"], part["offsets"]
            at += count
        self.shard = np.repeat(np.arange(num_shards, dtype=np.int32), counts)
        self.sizes = np.array([os.path.getsize(shard_paths(shard_dir, n)[0]) for n in range(num_shards)])

    def end(self, j):
        """End offset of record j in its shard file."""
        nxt = j + 1
        if nxt < self.shard.size and self.shard[nxt] == self.shard[j]:
            return int(self.starts[nxt])
        return int(self.sizes[self.shard[j]])


def gather(out_rec, out_idx, records, order, first_key, progress):
    """Copy the records order[0], order[1], ... (global indices; None: in shard order) to out_rec as keys
    first_key, first_key + 1, ... Consecutive records of one shard are read and written in one piece."""
    files, n, starts = {}, records.labels.size, records.starts
    for p in range(0, n, MERGE_BLOCK):
        js = np.arange(p, min(p + MERGE_BLOCK, n)) if order is None else order[p:p + MERGE_BLOCK]
        s = records.shard[js]
        breaks = np.flatnonzero((np.diff(js) != 1) | (np.diff(s) != 0)) + 1
        lines = []
        for run in np.split(np.arange(js.size), breaks):
            src = int(s[run[0]])
            if src not in files:
                if len(files) >= 256:  # bounded number of open shard files
                    for fd in files.values():
                        os.close(fd)
                    files.clear()
                files[src] = os.open(shard_paths(records.dir, src)[0], os.O_RDONLY)
            begin = int(starts[js[run[0]]])
            buf = bytearray(os.pread(files[src], records.end(int(js[run[-1]])) - begin, begin))
            base = out_rec.tell()
            for i in run:
                key = first_key + p + int(i)
                at = int(starts[js[i]]) - begin
                struct.pack_into("<Q", buf, at + ID_OFFSET, key)
                lines.append(f"{key}\t{base + at}\n")
            out_rec.write(buf)
        out_idx.write("".join(lines))
        progress.update(js.size)
    for fd in files.values():
        os.close(fd)


def merge(src, out_dir, shard_dir, num_shards, num_classes, shuffle, seed, expected):
    """train.rec/train.idx/property from the shards, if they hold the `expected` number of images (the count listed
    from SRC); -> (images, identities)."""
    records = ShardRecords(shard_dir, num_shards)
    labels, n = records.labels, records.labels.size
    if n != expected:  # before anything is written
        raise RecordIOError(f"{out_dir}: packed {n} images but {src} holds {expected}; delete {shard_dir} and run "
                            "again")
    num_classes = num_classes if num_classes is not None else int(labels.max()) + 1
    rec_path, idx_path = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    with open(rec_path + ".tmp", "wb") as rec, open(idx_path + ".tmp", "w") as idx, \
            tqdm(total=n, desc="merge", unit="img") as progress:
        if shuffle:
            gather(rec, idx, records, np.random.default_rng(seed).permutation(n), 0, progress)
        else:
            counts = np.bincount(labels, minlength=num_classes)
            bounds = np.concatenate([[1], 1 + np.cumsum(counts)])  # class c owns keys bounds[c]..bounds[c+1]-1
            a, b = 1 + n, 1 + n + num_classes
            idx.write(f"0\t{rec.tell()}\n")
            rec.write(encode_record(pack_header(IRHeader(0, [a, b], 0, 1))))
            in_order = bool(np.all(labels[1:] >= labels[:-1]))  # an ImageFolder is; a list file may not be
            gather(rec, idx, records, None if in_order else np.argsort(labels, kind="stable"), 1, progress)
            for c in range(num_classes):
                idx.write(f"{a + c}\t{rec.tell()}\n")
                rec.write(encode_record(pack_header(IRHeader(0, [bounds[c], bounds[c + 1]], 0, 0))))
    replace_atomically(rec_path + ".tmp", rec_path)
    replace_atomically(idx_path + ".tmp", idx_path)
    with open(os.path.join(out_dir, "property"), "w") as f:
        f.write(f"{num_classes},{SIZE},{SIZE}\n")
    return n, num_classes


def make_rec(src, out_dir, resize=False, quality=95, workers=1, shuffle=False, seed=0, ids_per_shard=1000,
             images_per_shard=20000):
    """Pack SRC into out_dir; -> (images, identities, {"resumed": shards, "list_s", "encode_s", "merge_s"})."""
    shards = Shards(src, ids_per_shard, images_per_shard)
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    options = [bool(resize), int(quality)]
    pool = Pool(workers) if workers > 1 else None
    t0 = time.perf_counter()
    try:
        listed = list(tqdm(parallel(pool, ((count_shard, src, task) for task in shards)), desc="list", unit="shard",
                           total=shards.count()))
        total = sum(count for count, _ in listed)
        if total == 0:
            raise RecordIOError(f"{src}: no images found")
        done = {n for n, (_, digest) in enumerate(listed) if shard_done(shard_dir, n, digest, options)}
        resumed = sum(listed[n][0] for n in done)
        t1 = time.perf_counter()
        if done:
            print(f"resuming: {len(done)} of {len(listed)} shards ({resumed} images) already packed")
        todo = ((encode_shard, src, shard_dir, n, task, listed[n][1], options)
                for n, task in enumerate(shards) if n not in done)
        with tqdm(total=total, initial=resumed, desc="encode", unit="img", smoothing=0.1) as progress:
            for count in parallel(pool, todo, ordered=False):
                progress.update(count)
    finally:
        if pool is not None:
            pool.terminate()
    t2 = time.perf_counter()
    num_images, num_ids = merge(src, out_dir, shard_dir, len(listed), shards.num_classes, shuffle, seed, total)
    shutil.rmtree(shard_dir)
    return num_images, num_ids, {"resumed": len(done), "list_s": t1 - t0, "encode_s": t2 - t1,
                                 "merge_s": time.perf_counter() - t2}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ImageFolder root or list file of '<path> <label>' lines")
    parser.add_argument("out", help="output folder for train.rec, train.idx, property")
    parser.add_argument("--resize", action="store_true", help="resize images that are not 112x112")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--shuffle", action="store_true",
                        help="records in a seeded random order, im2rec layout (for dali=True)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    parser.add_argument("--ids-per-shard", type=int, default=1000, help="identities per shard (ImageFolder)")
    parser.add_argument("--images-per-shard", type=int, default=20000, help="lines per shard (list file)")
    args = parser.parse_args()
    num_images, num_ids, stats = make_rec(args.src, args.out, args.resize, args.quality, args.workers, args.shuffle,
                                          args.seed, args.ids_per_shard, args.images_per_shard)
    print(f"wrote {num_images} images of {num_ids} identities to {args.out} (list {stats['list_s']:.1f} s, "
          f"encode {stats['encode_s']:.1f} s, merge {stats['merge_s']:.1f} s)")


if __name__ == "__main__":
    run_main(main)
