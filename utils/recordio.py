"""MXNet RecordIO (.rec/.idx) reader and writer without MXNet (format in docs/data.md).

A record is stored as one or more parts: magic, lrec (3-bit continuation flag, 29-bit length), payload, zero
padding to 4 bytes. The writer splits a payload wherever the magic occurs at a 4-byte-aligned offset (so a reader
scanning for the magic never mistakes payload bytes for a record start); the reader re-joins the parts and
re-inserts the magic between them. Records start with an IRHeader ('<IfQQ'); flag > 0 means `flag` float32 labels
follow it. insightface datasets add a header record 0 and one record per identity.
"""
import os
import struct
from array import array
from collections import namedtuple

import cv2
import numpy as np

from utils.cli import UserError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])


class RecordIOError(UserError):
    """Any malformed or unusable dataset input; the message names the file and the record key."""


def pack_header(header, payload=b""):
    """IRHeader + payload -> record bytes. A list/array label is written as `flag` float32 values after the header."""
    label = header.label
    if np.ndim(label) == 0:
        return struct.pack(_IR_FORMAT, header.flag, float(label), header.id, header.id2) + bytes(payload)
    label = np.asarray(label, dtype="<f4")
    return (struct.pack(_IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes() + bytes(payload))


def unpack_header(record):
    """Record bytes -> (IRHeader, payload). For flag > 0 the header's label is the float32 label array."""
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record)
    payload = record[_IR_SIZE:]
    if flag > 0:
        if len(payload) < 4 * flag:
            raise RecordIOError(f"IRHeader announces {flag} labels but the record holds only {len(payload)} bytes")
        label = np.frombuffer(payload, dtype="<f4", count=flag).copy()
        payload = payload[4 * flag:]
    return IRHeader(flag, label, id1, id2), payload


def encode_record(payload):
    """Payload -> on-disk bytes of one logical record (split at aligned magics exactly like dmlc-core)."""
    payload = bytes(payload)
    if len(payload) >= 1 << 29:
        raise RecordIOError(f"record of {len(payload)} bytes exceeds the RecordIO limit of 2**29 bytes")
    out = []
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out.append(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (pos - start)) + payload[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start > 0 else 0
    out.append(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | (len(payload) - start)) + payload[start:])
    out.append(b"\0" * (-len(payload) % 4))  # aligned splits keep len(payload) - start congruent to len(payload)
    return b"".join(out)


def decode_image(buf, where):
    """JPEG/PNG bytes -> RGB uint8 HWC. `where` names the file and key for the error message."""
    img = None
    if len(buf) > 0:
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise RecordIOError(f"{where}: cannot decode image ({len(buf)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_image(img_bgr, quality=95):
    """BGR uint8 HWC -> JPEG bytes (OpenCV, like insightface's builder)."""
    ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RecordIOError("cv2.imencode failed")
    return buf.tobytes()


def _read_idx(idx_path):
    """.idx text -> (keys int64, offsets int64); compact arrays, not a dict of Python ints."""
    if not os.path.isfile(idx_path):
        raise RecordIOError(f"{idx_path}: index file not found")
    keys, offsets = array("q"), array("q")
    with open(idx_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = (int(x) for x in fields)
            except ValueError:
                raise RecordIOError(f"{idx_path}: line {lineno}: expected '<key>\\t<offset>', got {line[:80]!r}")
            keys.append(key)
            offsets.append(offset)
    if not keys:
        raise RecordIOError(f"{idx_path}: index file is empty")
    return np.frombuffer(keys, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)


class IndexedRecordReader:
    """Random access to a .rec through its .idx.

    The file handle is opened lazily and re-opened when the process id changes, so DataLoader workers forked
    from a process that already read records never share a file position. Memory: two int64 arrays (keys,
    offsets); the keys array is dropped when keys are the contiguous range first..first+N-1 (insightface).
    """

    def __init__(self, rec_path, idx_path):
        self.rec_path, self.idx_path = rec_path, idx_path
        if not os.path.isfile(rec_path):
            raise RecordIOError(f"{rec_path}: record file not found")
        keys, self._offsets = _read_idx(idx_path)
        self._size = os.path.getsize(rec_path)
        bad = np.flatnonzero((self._offsets < 0) | (self._offsets + 8 > self._size))
        if bad.size:
            i = bad[0]
            raise RecordIOError(f"{idx_path}: record key {keys[i]}: offset {self._offsets[i]} is beyond the end of "
                                f"{rec_path} ({self._size} bytes)")
        self._first = int(keys[0])
        contiguous = bool(np.array_equal(keys, np.arange(self._first, self._first + keys.size)))
        if contiguous:
            self._sorted_keys = self._order = None
        else:
            self._order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._order]
        self._fh, self._pid = None, None

    def __len__(self):
        return self._offsets.size

    @property
    def keys(self):
        """Sorted keys: a range (no memory) for contiguous keys, else an int64 array."""
        if self._order is None:
            return range(self._first, self._first + self._offsets.size)
        return self._sorted_keys

    def _position(self, key):
        if self._order is None:
            i = key - self._first
            if 0 <= i < self._offsets.size:
                return i
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < self._sorted_keys.size and self._sorted_keys[i] == key:
                return int(self._order[i])
        raise RecordIOError(f"{self.idx_path}: record key {key} is not in the index")

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._fh

    def read_idx(self, key):
        """Raw record bytes (IRHeader + payload) of `key`, parts re-joined."""
        key = int(key)
        f = self._file()
        offset = int(self._offsets[self._position(key)])
        f.seek(offset)
        parts = []
        while True:
            # a bad first part may as well be a corrupt .idx offset: name both files
            source = "" if parts else f" (offset {offset} from {self.idx_path})"
            head = f.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path}: record key {key}: truncated record (file ends in a part "
                                    f"header){source}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: record key {key}: bad magic 0x{magic:08X} at byte "
                                    f"{f.tell() - 8} (expected 0x{MAGIC:08X}){source}")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read(length)
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: record key {key}: truncated record (needs {length} bytes, "
                                    f"file has {len(data)} left){source}")
            parts.append(data)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            if cflag == 1 and len(parts) > 1 or cflag == 2 and len(parts) == 1:
                raise RecordIOError(f"{self.rec_path}: record key {key}: continuation flag {cflag} out of order")
            f.seek(-length % 4, os.SEEK_CUR)  # multi-part payload lengths are multiples of 4; kept for safety

    def read_header(self, key):
        """(IRHeader, payload) of `key`; header errors name the file and key."""
        try:
            return unpack_header(self.read_idx(key))
        except RecordIOError as e:
            if str(e).startswith(self.rec_path):
                raise
            raise RecordIOError(f"{self.rec_path}: record key {key}: {e}") from None

    def close(self):
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None

    def __getstate__(self):  # picklable for spawn-started workers: the handle never travels
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, None
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IndexedRecordWriter:
    """Writes a .rec and its .idx (`key\\toffset` lines, like MXIndexedRecordIO)."""

    def __init__(self, rec_path, idx_path):
        self.rec_path, self.idx_path = rec_path, idx_path
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write_idx(self, key, record):
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        self._rec.write(encode_record(record))

    def close(self):
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def image_label(header):
    """Class id of an image record (first element of an array label, like arcface_torch). The float must be a
    whole number: a corrupted label field must not be truncated into some valid-looking class id."""
    label = float(header.label[0] if np.ndim(header.label) else header.label)
    if not (np.isfinite(label) and label == int(label)):
        raise RecordIOError(f"label {label!r} is not an integer class id")
    return int(label)


def identity_starts(reader, image_keys, num_ids):
    """-> int64 [num_ids + 1] with the images of class c at keys starts[c] .. starts[c+1]-1.

    `image_keys` is the range(1, A) of insightface_layout. The identity records (keys A .. A+num_ids-1, labels
    [start, end)) must split it into consecutive ranges in class order, as insightface writes them. The dataset
    checks every image label against its key's range, so a flipped label field or a .idx offset pointing at
    another class's record is an error, not a silently wrong label."""
    first, stop = image_keys.start, image_keys.stop
    starts = np.empty(num_ids + 1, dtype=np.int64)
    starts[0] = first
    for c in range(num_ids):
        key = stop + c
        header, _ = reader.read_header(key)
        bounds = header.label.tolist() if header.flag >= 2 else None
        ok = bounds is not None and all(np.isfinite(v) and v == int(v) for v in bounds[:2])
        if not ok or int(bounds[0]) != starts[c] or not starts[c] <= int(bounds[1]) <= stop:
            raise RecordIOError(f"{reader.rec_path}: record key {key}: identity record of class {c} has labels "
                                f"{bounds if bounds is not None else header.label}, expected [{starts[c]}, end) with "
                                f"end <= {stop} (identity records must split the image keys in class order; the file "
                                f"is corrupt or not in the insightface layout)")
        starts[c + 1] = int(bounds[1])
    if starts[-1] != stop:
        raise RecordIOError(f"{reader.rec_path}: the {num_ids} identity records cover image keys {first}.."
                            f"{starts[-1] - 1}, but the header lists images up to key {stop - 1}")
    return starts


def insightface_layout(reader):
    """-> (image_keys, num_identities or None).

    With an insightface header (record 0 with flag > 0, labels [A, B]) images are keys 1..A-1 and identities
    the B-A range records; otherwise every key in the .idx is an image (e.g. a rec made by im2rec).
    """
    keys = reader.keys
    if keys[0] == 0:
        header, _ = reader.read_header(0)
        if header.flag > 0:
            if header.flag < 2:
                raise RecordIOError(f"{reader.rec_path}: record key 0: header record needs labels [A, B], "
                                    f"got {header.label.tolist()}")
            a, b = int(header.label[0]), int(header.label[1])
            if not 1 <= a <= b or b > keys[-1] + 1:
                raise RecordIOError(f"{reader.rec_path}: record key 0: header labels [{a}, {b}] do not fit the "
                                    f"{len(keys)} records of {reader.idx_path}")
            return range(1, a), b - a
    return keys, None
