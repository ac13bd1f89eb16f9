import hashlib
import json
import multiprocessing
import os
import struct

import numpy as np
import pytest

from utils.recordio import (IRHeader, IndexedRecordReader, IndexedRecordWriter, RecordIOError, decode_image,
                            encode_record, image_label, insightface_layout, pack_header, unpack_header)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "mxnet")
MAGIC = b"\x0a\x23\xd7\xce"


def part(cflag, data):
    """Reference framing of one part (docs/data.md), written out by hand."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def fixture_reader():
    return IndexedRecordReader(os.path.join(FIXTURE, "train.rec"), os.path.join(FIXTURE, "train.idx"))


def test_pack_header_scalar_and_array_bytes():
    assert pack_header(IRHeader(0, 3.0, 5, 6), b"xy") == struct.pack("<IfQQ", 0, 3.0, 5, 6) + b"xy"
    packed = pack_header(IRHeader(0, [1, 2.5], 7, 0), b"img")
    assert packed == struct.pack("<IfQQ", 2, 0.0, 7, 0) + struct.pack("<2f", 1, 2.5) + b"img"
    header, payload = unpack_header(packed)
    assert header.flag == 2 and header.label.tolist() == [1.0, 2.5] and header.id == 7 and payload == b"img"
    assert image_label(header) == 1
    header, payload = unpack_header(pack_header(IRHeader(0, 9.0, 1, 2), b""))
    assert header == IRHeader(0, 9.0, 1, 2) and payload == b"" and image_label(header) == 9


def test_encode_record_framing():
    assert encode_record(b"abcde") == part(0, b"abcde")
    assert encode_record(b"") == part(0, b"")
    # aligned magics split the record (first/middle/last), the magic itself is dropped
    assert encode_record(b"abcd" + MAGIC + MAGIC + b"xyz") == part(1, b"abcd") + part(2, b"") + part(3, b"xyz")
    assert encode_record(MAGIC) == part(1, b"") + part(3, b"")
    # unaligned magic stays inside the payload
    assert encode_record(b"a" + MAGIC + b"b") == part(0, b"a" + MAGIC + b"b")


def test_round_trip_random_records(tmp_path):
    rng = np.random.default_rng(0)
    records = {}
    for key in [5, 0, 17, 3, 100, 2]:  # non-contiguous, unsorted keys
        buf = bytearray(rng.integers(0, 256, int(rng.integers(0, 90)), dtype=np.uint8).tobytes())
        for pos in rng.integers(0, max(len(buf) - 3, 1), 3):
            buf[pos:pos + 4] = MAGIC
        records[key] = bytes(buf[:len(buf)])
    records[2] = MAGIC * 3
    rec, idx = str(tmp_path / "a.rec"), str(tmp_path / "a.idx")
    with IndexedRecordWriter(rec, idx) as w:
        for key, data in records.items():
            w.write_idx(key, data)
    reader = IndexedRecordReader(rec, idx)
    assert sorted(list(reader.keys)) == sorted(records)
    for key in [100, 0, 2, 17, 3, 5]:
        assert reader.read_idx(key) == records[key]
    with pytest.raises(RecordIOError, match=r"a\.idx: record key 4 is not in the index"):
        reader.read_idx(4)


def test_mxnet_fixture_every_record_label_and_pixel():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    decoded = np.load(os.path.join(FIXTURE, "decoded_rgb.npz"))["images"]
    reader = fixture_reader()
    assert list(reader.keys) == sorted(int(k) for k in expected)
    images = []
    for key in reader.keys:
        exp = expected[str(key)]
        raw = reader.read_idx(key)
        assert hashlib.sha256(raw).hexdigest() == exp["sha256"]
        header, payload = unpack_header(raw)
        assert (header.flag, header.id, header.id2, len(payload)) == (exp["flag"], exp["id"], exp["id2"],
                                                                        exp["payload_len"])
        label = header.label.tolist() if header.flag else float(header.label)
        assert label == exp["label"]
        if payload:
            images.append(decode_image(payload, "fixture"))
    assert len(images) == len(decoded) == 4
    for ours, theirs in zip(images, decoded):
        np.testing.assert_array_equal(ours, theirs)  # MXNet's decoder output, RGB
    image_keys, num_ids = insightface_layout(reader)
    assert list(image_keys) == [1, 2, 3, 4] and num_ids == 2
    assert [image_label(reader.read_header(k)[0]) for k in image_keys] == [0, 0, 1, 1]
    assert [reader.read_header(k)[0].label.tolist() for k in (5, 6)] == [[1, 3], [3, 5]]


def test_fixture_exercises_continuation_and_our_writer_reproduces_it(tmp_path):
    with open(os.path.join(FIXTURE, "train.rec"), "rb") as f:
        data = f.read()
    flags, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == 0xCED7230A
        flags.append(lrec >> 29)
        pos += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) % 4)
    assert flags.count(1) == 1 and flags.count(2) == 1 and flags.count(3) == 1
    reader = fixture_reader()
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    with IndexedRecordWriter(rec, idx) as w:
        for key in reader.keys:
            w.write_idx(key, reader.read_idx(key))
    for name in ("train.rec", "train.idx"):
        with open(tmp_path / name, "rb") as ours, open(os.path.join(FIXTURE, name), "rb") as theirs:
            assert ours.read() == theirs.read()


def _write(tmp_path, records):
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    with IndexedRecordWriter(rec, idx) as w:
        for key, data in records.items():
            w.write_idx(key, data)
    return rec, idx


def test_missing_and_empty_idx(tmp_path):
    rec, idx = _write(tmp_path, {0: b"abcd"})
    with pytest.raises(RecordIOError, match=r"nope\.idx: index file not found"):
        IndexedRecordReader(rec, str(tmp_path / "nope.idx"))
    open(idx, "w").close()
    with pytest.raises(RecordIOError, match=r"train\.idx: index file is empty"):
        IndexedRecordReader(rec, idx)


def test_offset_beyond_file(tmp_path):
    rec, idx = _write(tmp_path, {0: b"abcd", 1: b"efgh"})
    with open(idx, "a") as f:
        f.write("2\t4096\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: record key 2: offset 4096 is beyond the end of .*train\.rec"):
        IndexedRecordReader(rec, idx)


def test_truncated_record(tmp_path):
    rec, idx = _write(tmp_path, {0: b"abcd", 1: b"x" * 40})
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 10)
    reader = IndexedRecordReader(rec, idx)
    assert reader.read_idx(0) == b"abcd"
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 1: truncated record"):
        reader.read_idx(1)


def test_bad_magic(tmp_path):
    rec, idx = _write(tmp_path, {0: b"abcd", 1: b"efgh"})
    with open(rec, "r+b") as f:
        f.seek(12)  # start of record 1
        f.write(b"\0\0\0\0")
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 1: bad magic 0x00000000"):
        IndexedRecordReader(rec, idx).read_idx(1)


def test_short_header_names_key(tmp_path):
    rec, idx = _write(tmp_path, {0: b"abcd"})
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 0: .*shorter than the 24-byte IRHeader"):
        IndexedRecordReader(rec, idx).read_header(0)


def test_undecodable_image_names_where():
    with pytest.raises(RecordIOError, match="some.rec: record key 9: cannot decode image"):
        decode_image(b"not a jpeg", "some.rec: record key 9")


def _read_in_child(reader, queue):
    inherited = reader._fh
    data = [reader.read_idx(k) for k in (3, 1)]
    queue.put((data, reader._fh is not inherited and reader._pid == os.getpid()))


def test_handle_reopened_after_fork(tmp_path):
    records = {k: bytes([k]) * (10 + k) for k in range(5)}
    reader = IndexedRecordReader(*_write(tmp_path, records))
    assert reader.read_idx(4) == records[4]  # parent opens its handle before the fork
    parent_handle = reader._fh
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, queue))
    child.start()
    assert queue.get(timeout=30) == ([records[3], records[1]], True)  # child opened its own handle
    child.join(30)
    assert reader._fh is parent_handle and reader.read_idx(0) == records[0]
