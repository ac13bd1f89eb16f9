"""Summarise an insightface RecordIO dataset; with --check decode every image and stop at the first bad record.

    python tools/rec_info.py DIR [--check]      # DIR holds train.rec and train.idx

Prints records, the header record, images, identities and the label range. Without a header record every key is
an image and the label range comes from reading every image header. --check also decodes every image, requires
112x112 and, with identity records, that each image's label is the identity whose range holds its key; it exits
with status 2 naming the first bad record. Streams: one record in memory at a time.
"""
import argparse
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402
from utils.recordio import (IndexedRecordReader, RecordIOError, decode_image, image_label,  # noqa: E402
                            insightface_layout)


def check_images(reader, image_keys, num_ids):
    """Decodes every image; -> (min label, max label)."""
    lo, hi = None, None
    ident, ident_end = 0, None
    for key in tqdm(image_keys, desc="check", unit="rec", file=sys.stderr):
        key = int(key)
        where = f"{reader.rec_path}: record key {key}"
        header, payload = reader.read_header(key)
        label = image_label(header)
        if num_ids is not None:
            while ident_end is None or key >= ident_end:  # identity records list ranges in key order
                if ident >= num_ids:
                    raise RecordIOError(f"{where}: not inside any identity range")
                rng, _ = reader.read_header(int(image_keys[-1]) + 1 + ident)
                ident_start, ident_end = int(rng.label[0]), int(rng.label[1])
                ident += 1
            if not ident_start <= key < ident_end or label != ident - 1:
                raise RecordIOError(f"{where}: label {label} but the identity records put it in class {ident - 1}")
        img = decode_image(payload, where)
        if img.shape[:2] != (112, 112):
            raise RecordIOError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected 112x112")
        lo, hi = (label, label) if lo is None else (min(lo, label), max(hi, label))
    return lo, hi


def scan_labels(reader, image_keys):
    lo = hi = None
    for key in tqdm(image_keys, desc="labels", unit="rec", file=sys.stderr):
        label = image_label(reader.read_header(int(key))[0])
        lo, hi = (label, label) if lo is None else (min(lo, label), max(hi, label))
    return lo, hi


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder with train.rec and train.idx")
    parser.add_argument("--check", action="store_true", help="decode every image and verify labels")
    args = parser.parse_args()
    reader = IndexedRecordReader(os.path.join(args.root, "train.rec"), os.path.join(args.root, "train.idx"))
    image_keys, num_ids = insightface_layout(reader)
    print(f"records: {len(reader)}")
    if num_ids is not None:
        header, _ = reader.read_header(0)
        print(f"header (key 0): flag={header.flag} label={header.label.tolist()} id={header.id} id2={header.id2}")
    else:
        print("header: none (every record is an image)")
    print(f"images: {len(image_keys)} (keys {image_keys[0]}..{image_keys[-1]})")
    if args.check:
        lo, hi = check_images(reader, image_keys, num_ids)
    elif num_ids is not None:
        lo, hi = 0, num_ids - 1
    else:
        lo, hi = scan_labels(reader, image_keys)
    print(f"identities: {num_ids if num_ids is not None else hi + 1}")
    print(f"label range: {lo}..{hi}")
    if args.check:
        print("check: all images decode")


if __name__ == "__main__":
    run_main(main)
