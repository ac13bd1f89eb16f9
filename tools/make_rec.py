"""Pack face images into insightface RecordIO: OUT/train.rec, OUT/train.idx, OUT/property (docs/data.md).

    python tools/make_rec.py SRC OUT [--resize] [--quality 95]

SRC is an ImageFolder tree (SRC/<identity>/<image>, labels = sorted folder order) or a list file with one
`path label` line per image (relative paths are relative to the list file; labels are integers 0..C-1).
Layout: record 0 = header [A, B]; keys 1..A-1 = images grouped by label; keys A..B-1 = one [start, end) range per
identity. Images must be 112x112 unless --resize is given; 112x112 JPEGs are stored as they are, anything else is
encoded as JPEG (quality 95, like insightface). Two streaming passes (count, then write): memory holds one int64
per image for the index and two per identity, never the images.
"""
import argparse
import os
import sys
from array import array

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402
from utils.recordio import IRHeader, RecordIOError, decode_image, encode_image, encode_record, pack_header  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SIZE = 112


def iter_samples(src):
    """Yields (path, label) without building a list."""
    if os.path.isdir(src):
        classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
        for label, name in enumerate(classes):
            folder = os.path.join(src, name)
            for fname in sorted(os.listdir(folder)):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    yield os.path.join(folder, fname), label
        return
    if not os.path.isfile(src):
        raise RecordIOError(f"{src}: neither an image folder nor a list file")
    base = os.path.dirname(os.path.abspath(src))
    with open(src, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    path, label = line.rsplit(None, 1)
                    label = int(label)
                except ValueError:
                    raise RecordIOError(f"{src}: line {lineno}: expected '<path> <label>', "
                                        f"got {line.strip()[:80]!r}") from None
                if label < 0:
                    raise RecordIOError(f"{src}: line {lineno}: negative label {label}")
                yield os.path.join(base, path.strip()), label
        except UnicodeDecodeError:
            raise RecordIOError(f"{src}: line {lineno + 1}: not UTF-8 text (expected a list file of "
                                "'<path> <label>' lines)") from None


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


def make_rec(src, out_dir, resize=False, quality=95):
    counts = array("q")
    for _, label in iter_samples(src):
        if label >= len(counts):
            counts.extend([0] * (label + 1 - len(counts)))
        counts[label] += 1
    num_images = sum(counts)
    if num_images == 0:
        raise RecordIOError(f"{src}: no images found")
    starts = np.concatenate([[1], 1 + np.cumsum(counts)])  # identity c owns keys starts[c]..starts[c+1]-1
    a, b = 1 + num_images, 1 + num_images + len(counts)
    next_key = starts[:-1].copy()
    offsets = np.zeros(b, dtype=np.int64)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train.rec"), "wb") as rec:
        rec.write(encode_record(pack_header(IRHeader(0, [a, b], 0, 1))))
        for path, label in tqdm(iter_samples(src), total=num_images, desc="images", unit="img"):
            key = next_key[label]
            next_key[label] += 1
            offsets[key] = rec.tell()
            rec.write(encode_record(pack_header(IRHeader(0, float(label), int(key), 0),
                                                image_bytes(path, resize, quality))))
        for label in range(len(counts)):
            offsets[a + label] = rec.tell()
            rec.write(encode_record(pack_header(IRHeader(0, [starts[label], starts[label + 1]], 0, 0))))
    with open(os.path.join(out_dir, "train.idx"), "w") as idx:
        for key in range(b):
            idx.write(f"{key}\t{offsets[key]}\n")
    with open(os.path.join(out_dir, "property"), "w") as f:
        f.write(f"{len(counts)},{SIZE},{SIZE}\n")
    return num_images, len(counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ImageFolder root or list file of '<path> <label>' lines")
    parser.add_argument("out", help="output folder for train.rec, train.idx, property")
    parser.add_argument("--resize", action="store_true", help="resize images that are not 112x112")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    args = parser.parse_args()
    num_images, num_ids = make_rec(args.src, args.out, args.resize, args.quality)
    print(f"wrote {num_images} images of {num_ids} identities to {args.out}")


if __name__ == "__main__":
    run_main(main)
