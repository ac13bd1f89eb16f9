"""tools/make_rec.py at scale: shards packed in parallel, resumed after a failure, shuffled, counted."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dataset import MXFaceDataset
from tools import make_rec as mr
from utils.recordio import IndexedRecordReader, RecordIOError, unpack_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = [3, 1, 4, 2, 5]  # images of identities id0..id4


def run(*args):
    return subprocess.run([sys.executable, "tools/make_rec.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def make_folder(root, counts=COUNTS):
    """112x112 images: JPEGs (stored as they are) and PNGs (re-encoded)."""
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        os.makedirs(os.path.join(root, f"id{c}"))
        for i in range(n):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            cv2.imwrite(os.path.join(root, f"id{c}", f"{i}.{'png' if i % 2 else 'jpg'}"), img)


def output(out):
    return [open(os.path.join(out, f), "rb").read() for f in ("train.rec", "train.idx", "property")]


def records(out):
    reader = IndexedRecordReader(os.path.join(out, "train.rec"), os.path.join(out, "train.idx"))
    return [unpack_header(reader.read_idx(k)) for k in reader.keys]


def test_parallel_shards_give_the_one_shard_file(tmp_path):
    src = str(tmp_path / "src")
    make_folder(src)
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    r = run(src, one, "--workers", "1", "--ids-per-shard", "100")
    assert r.returncode == 0, r.stderr
    r = run(src, many, "--workers", "2", "--ids-per-shard", "2")  # shards {id0, id1}, {id2, id3}, {id4}
    assert r.returncode == 0, r.stderr
    assert "wrote 15 images of 5 identities" in r.stdout
    assert output(many) == output(one)
    assert not os.path.exists(os.path.join(many, "shards"))
    recs = records(many)
    assert [h.id for h, _ in recs[1:16]] == list(range(1, 16))  # each record's id field is its key
    assert [h.label for h, _ in recs[1:16]] == [c for c, n in enumerate(COUNTS) for _ in range(n)]
    assert recs[0][0].label.tolist() == [16, 21]


def test_resume_skips_finished_shards(tmp_path):
    src, out, ref = str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "ref")
    make_folder(src)
    assert run(src, ref, "--ids-per-shard", "1").returncode == 0
    good = open(os.path.join(src, "id2", "1.png"), "rb").read()
    open(os.path.join(src, "id2", "1.png"), "wb").write(b"not an image")
    r = run(src, out, "--workers", "1", "--ids-per-shard", "1")  # one process: shards 0 and 1, then the failure
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {os.path.join(src, 'id2', '1.png')}: cannot decode image (12 bytes)"
    assert sorted(f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".json")) == ["000000.json",
                                                                                                  "000001.json"]
    open(os.path.join(src, "id2", "1.png"), "wb").write(good)
    # a finished shard is not encoded again: spoiling one of its images now changes nothing
    open(os.path.join(src, "id0", "0.jpg"), "wb").write(b"spoilt")
    r = run(src, out, "--workers", "2", "--ids-per-shard", "1")
    assert r.returncode == 0, r.stderr
    assert "resuming: 2 of 5 shards (4 images) already packed" in r.stdout
    assert output(out) == output(ref)


def test_shuffle_is_a_seeded_permutation_in_im2rec_layout(tmp_path):
    src, grouped, shuffled = str(tmp_path / "src"), str(tmp_path / "grouped"), str(tmp_path / "shuffled")
    make_folder(src)
    assert run(src, grouped).returncode == 0
    r = run(src, shuffled, "--shuffle", "--seed", "3", "--ids-per-shard", "2")
    assert r.returncode == 0, r.stderr
    ref, got = records(grouped)[1:16], records(shuffled)
    perm = np.random.default_rng(3).permutation(15)
    assert len(got) == 15 and [h.id for h, _ in got] == list(range(15))  # keys 0..N-1, no header record
    assert [(h.label, p) for h, p in got] == [(ref[j][0].label, ref[j][1]) for j in perm]
    ds = MXFaceDataset(shuffled, num_classes=5, flip=False)
    assert ds.starts is None and [int(ds[i][1]) for i in range(15)] == [int(ref[j][0].label) for j in perm]
    assert open(os.path.join(shuffled, "property")).read() == "5,112,112\n"


def test_count_check_against_the_folder(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_folder(src)
    open(os.path.join(src, "id2", "1.png"), "wb").write(b"x")
    with pytest.raises(RecordIOError, match="cannot decode"):
        mr.make_rec(src, out, ids_per_shard=2)  # shard 0 (id0, id1) finished, shard 1 failed
    make_folder(str(tmp_path / "fresh"))
    os.replace(os.path.join(tmp_path, "fresh", "id2", "1.png"), os.path.join(src, "id2", "1.png"))
    npz = mr.shard_paths(os.path.join(out, "shards"), 0)[1]  # a shard file that lost a record
    with np.load(npz) as part:
        offsets, labels = part["offsets"][:-1], part["labels"][:-1]
    with open(npz, "wb") as f:
        np.savez(f, offsets=offsets, labels=labels)
    with pytest.raises(RecordIOError) as e:
        mr.make_rec(src, out, ids_per_shard=2)
    assert str(e.value) == (f"{out}: packed 14 images but {src} holds 15; delete {os.path.join(out, 'shards')} and "
                            "run again")
    assert not os.path.exists(os.path.join(out, "train.rec.tmp"))  # checked before anything is written


def test_folder_changed_while_packing(tmp_path, monkeypatch):
    src = str(tmp_path / "src")
    make_folder(src, [2])
    listings = iter([["0.jpg", "1.png"], ["0.jpg"]])  # the count pass sees two images, the encoder one
    monkeypatch.setattr(mr, "list_identity", lambda root, name: next(listings))
    with pytest.raises(RecordIOError) as e:
        mr.make_rec(src, str(tmp_path / "out"))
    assert str(e.value) == f"{src}: the images of shard 0 changed while packing (listed again: 1 images); run the command again"
