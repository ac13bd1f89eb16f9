"""Writes the RecordIO fixture in tests/data/mxnet/ with real MXNet 1.9.1 (recipe: tests/data/README.md).

Run only in the throwaway MXNet environment, never from the tests:
    /tmp/mxvenv/bin/python tests/data/make_mxnet_fixture.py tests/data/mxnet
    /tmp/mxvenv/bin/python tests/data/make_mxnet_fixture.py --check-ours /tmp/mxcheck   # scratch folder
"""
import hashlib
import json
import os
import struct
import sys

import cv2
import mxnet as mx
import numpy as np

MAGIC = struct.pack("<I", 0xCED7230A)


def images():
    """Four simple 112x112 BGR images (flat blocks and a gradient compress to ~1-2 KB at quality 40)."""
    out = []
    for i in range(4):
        img = np.zeros((112, 112, 3), np.uint8)
        img[:, :, i % 3] = np.linspace(0, 255, 112, dtype=np.uint8)[None, :]
        img[20 + 10 * i:60 + 10 * i, 30:80] = (40 * i, 200 - 30 * i, 90)
        out.append(img)
    return out


def write(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rec = mx.recordio.MXIndexedRecordIO(os.path.join(out_dir, "train.idx"), os.path.join(out_dir, "train.rec"), "w")
    labels = [0, 0, 1, 1]  # two identities: keys 1-2 and 3-4
    a, b = 1 + len(labels), 1 + len(labels) + 2
    rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [a, b], 0, 1), b""))
    for i, img in enumerate(images()):
        key = i + 1
        # key 3 carries an array label (its first element is the class id, like arcface_torch reads it)
        label = [float(labels[i]), 7.0] if key == 3 else float(labels[i])
        s = mx.recordio.pack_img(mx.recordio.IRHeader(0, label, key, 0), img, quality=40, img_fmt=".jpg")
        if key == 2:
            # Bytes after the JPEG end marker are ignored by decoders. Append two magics at 4-byte-aligned offsets
            # of the record so dmlc splits it into first/middle/last parts (continuation flags 1, 2, 3).
            s += b"\0" * (-len(s) % 4) + MAGIC + b"tail" + MAGIC + b"end"
        rec.write_idx(key, s)
    for ident, (start, end) in enumerate([(1, 3), (3, 5)]):
        rec.write_idx(a + ident, mx.recordio.pack(mx.recordio.IRHeader(0, [start, end], 0, 0), b""))
    rec.close()
    with open(os.path.join(out_dir, "property"), "w") as f:
        f.write("2,112,112\n")
    dump_expected(out_dir)


def dump_expected(out_dir):
    """Labels/headers of every record and the images decoded by MXNet's own decoder (mx.image.imdecode, RGB)."""
    rec = mx.recordio.MXIndexedRecordIO(os.path.join(out_dir, "train.idx"), os.path.join(out_dir, "train.rec"), "r")
    records, decoded = {}, []
    for key in sorted(rec.keys):
        raw = rec.read_idx(key)
        header, payload = mx.recordio.unpack(raw)
        label = header.label.tolist() if header.flag > 0 else float(header.label)
        records[str(key)] = {"flag": int(header.flag), "label": label, "id": int(header.id), "id2": int(header.id2),
                             "payload_len": len(payload), "sha256": hashlib.sha256(raw).hexdigest()}
        if len(payload):
            decoded.append(mx.image.imdecode(payload).asnumpy())
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    np.savez_compressed(os.path.join(out_dir, "decoded_rgb.npz"), images=np.stack(decoded))


def mx_read_all(out_dir):
    """-> {key: raw record} read by MXNet through the .idx; also checks a sequential read sees the same count."""
    rec = mx.recordio.MXIndexedRecordIO(os.path.join(out_dir, "train.idx"), os.path.join(out_dir, "train.rec"), "r")
    records = {key: rec.read_idx(key) for key in rec.keys}
    for raw in records.values():
        payload = mx.recordio.unpack(raw)[1]
        if payload[:2] == b"\xff\xd8":  # JPEG; other payloads are arbitrary bytes
            mx.image.imdecode(payload)
    seq = mx.recordio.MXRecordIO(os.path.join(out_dir, "train.rec"), "r")
    n = 0
    while seq.read() is not None:
        n += 1
    assert n == len(records), (n, len(records))
    return records


def check_ours(tmp_dir):
    """Writes with OUR utils/recordio.py and tools/make_rec.py (they import under NumPy 1.23 too); reads with MXNet."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, repo)
    from utils.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, pack_header
    from tools.make_rec import make_rec

    fixture = os.path.join(repo, "tests", "data", "mxnet")
    # 1. re-pack the MXNet fixture record by record: byte-identical files
    ours = os.path.join(tmp_dir, "repack")
    os.makedirs(ours, exist_ok=True)
    reader = IndexedRecordReader(os.path.join(fixture, "train.rec"), os.path.join(fixture, "train.idx"))
    with IndexedRecordWriter(os.path.join(ours, "train.rec"), os.path.join(ours, "train.idx")) as w:
        for key in reader.keys:
            w.write_idx(key, reader.read_idx(key))
    for name in ("train.rec", "train.idx"):
        with open(os.path.join(ours, name), "rb") as f1, open(os.path.join(fixture, name), "rb") as f2:
            assert f1.read() == f2.read(), name
    assert mx_read_all(ours) == {int(k): reader.read_idx(int(k)) for k in reader.keys}
    # 2. 200 random payloads with magics at random (aligned and unaligned) offsets
    rng = np.random.default_rng(0)
    ours = os.path.join(tmp_dir, "random")
    os.makedirs(ours, exist_ok=True)
    expected = {}
    with IndexedRecordWriter(os.path.join(ours, "train.rec"), os.path.join(ours, "train.idx")) as w:
        for key in range(200):
            n = int(rng.integers(0, 300))
            buf = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            for _ in range(int(rng.integers(0, 4))):
                if n >= 4:
                    p = int(rng.integers(0, n - 3))
                    buf[p:p + 4] = MAGIC
            label = float(key % 7) if key % 2 else [key, 1.5, 2.0]
            expected[key] = pack_header(IRHeader(0, label, key, 0), bytes(buf))
            w.write_idx(key, expected[key])
    assert mx_read_all(ours) == expected
    # 3. tools/make_rec.py on an ImageFolder of 3 identities (one image resized from 120x100)
    src, ours = os.path.join(tmp_dir, "folder"), os.path.join(tmp_dir, "made")
    for c in range(3):
        os.makedirs(os.path.join(src, f"id{c}"), exist_ok=True)
        for i in range(c + 1):
            shape = (100, 120, 3) if c == i == 2 else (112, 112, 3)
            cv2.imwrite(os.path.join(src, f"id{c}", f"{i}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
    make_rec(src, ours, resize=True)
    records = mx_read_all(ours)
    header = mx.recordio.unpack(records[0])[0]
    assert header.flag == 2 and header.label.tolist() == [7.0, 10.0], header
    labels = [float(mx.recordio.unpack(records[k])[0].label) for k in range(1, 7)]
    assert labels == [0, 1, 1, 2, 2, 2], labels
    ranges = [mx.recordio.unpack(records[k])[0].label.tolist() for k in range(7, 10)]
    assert ranges == [[1, 2], [2, 4], [4, 7]], ranges
    for k in range(1, 7):
        assert mx.image.imdecode(mx.recordio.unpack(records[k])[1]).shape == (112, 112, 3)
    print(f"MXNet {mx.__version__} read our writer's output identically (re-packed fixture byte-identical, "
          f"200 random magic-laden records, make_rec.py output)")


if __name__ == "__main__":
    if sys.argv[1] == "--check-ours":
        check_ours(sys.argv[2])
    else:
        write(sys.argv[1])
