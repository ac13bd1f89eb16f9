"""Corrupted-data fuzzing of .rec, .idx, .bin and IJB-C meta files.

Seeded byte flips (XOR with a random non-zero byte; half of them aimed at the structural bytes: part headers,
IRHeaders, labels, image headers, pickle opcodes) and truncations of small generated files. Every case must end in

  * the project's own error: RecordIOError (.rec/.idx), BinLoadError (.bin), ValueError (IJB meta), each with the
    corrupted file's name in the message; or
  * a correct read: every label equals the label written (and, for .rec, every key still maps to its class).

A "silently wrong label" is a read that succeeds with a label different from the one written. For .rec files the
identity records (class c owns image keys [start_c, end_c)) make the class of every image key known independently of
its label field, and the dataset checks the label against it, so any single corruption of a label or of an .idx
offset is detected. The formats with no redundancy cannot do this, and the test pins down exactly which cases those
are (the documented limits, see TROUBLESHOOTING.md):
  * .bin: a flip that turns a pickled True (0x88) into False (0x89) or back changes that pair's label;
  * IJB meta: a digit changed into another digit yields another valid number (template/media id, landmark,
    score, pair label 0<->1) on that one line; a truncation of template_pair_label.txt at a line boundary drops the
    tail pairs. The test asserts that such reads differ from the original only on the line that was hit (or only
    by the dropped tail), never anywhere else.

The cases run in a child process (python tests/test_fuzz.py <dir>) that reports one line per case, so a hang (no
report for HANG_S seconds) or an interpreter crash (the child dies) is caught and names the case; decoding itself
runs in that one process, like in a DataLoader worker.
"""
import json
import os
import select
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 2024
NUM_IDS, PER_ID = 3, 4
HANG_S = 60  # no report from the child for this long = a hang (a whole case normally takes milliseconds)
STARTUP_S = 120  # allowance for the child's start (imports, clean reads) before its first case, kept apart from HANG_S
COUNTS = dict(rec_flip=160, rec_cut=30, idx_flip=60, idx_cut=20, bin_flip=90, bin_cut=20, meta_flip=90, meta_cut=30)
META_FILES = ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt",
              "ijbc_1N_probe_mixed.csv")


# ---------------------------------------------------------------- clean files

def smooth_image(rng):
    """112x112 BGR: a random colour gradient plus mild noise (small JPEG/PNG)."""
    y, x = np.mgrid[0:112, 0:112] / 111.0
    base = rng.uniform(0, 255, 3) * x[..., None] + rng.uniform(0, 255, 3) * y[..., None]
    return np.clip(base / 2 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def with_magic_comment(jpeg, magic_bytes):
    """Insert a JPEG comment segment holding the RecordIO magic at a 4-byte aligned offset of the record payload
    (24-byte IRHeader + SOI + segment header = 30; 2 pad bytes), so the writer splits the record into parts."""
    data = b"\0\0" + magic_bytes + b"tail"
    return jpeg[:2] + b"\xff\xfe" + (len(data) + 2).to_bytes(2, "big") + data + jpeg[2:]


def make_rec(root, rng):
    """insightface layout: header record 0 ([A, B]), images 1..A-1, identity records A..B-1. Returns
    {key: label} and the byte spans of structural fields in train.rec."""
    from utils.recordio import _MAGIC_BYTES, IRHeader, IndexedRecordWriter, encode_image, pack_header

    a = 1 + NUM_IDS * PER_ID
    labels = {1 + i: i // PER_ID for i in range(NUM_IDS * PER_ID)}
    with IndexedRecordWriter(os.path.join(root, "train.rec"), os.path.join(root, "train.idx")) as w:
        w.write_idx(0, pack_header(IRHeader(0, [a, a + NUM_IDS], 0, 1)))
        for key, label in labels.items():
            jpeg = encode_image(smooth_image(rng), 90)
            if key % PER_ID == 2:
                jpeg = with_magic_comment(jpeg, _MAGIC_BYTES)  # one multi-part record per identity
            header = IRHeader(0, [float(label), 0.0], key, 0) if key == 3 else IRHeader(0, float(label), key, 0)
            w.write_idx(key, pack_header(header, jpeg))
        for c in range(NUM_IDS):
            w.write_idx(a + c, pack_header(IRHeader(0, [1 + c * PER_ID, 1 + (c + 1) * PER_ID], 0, 0)))
    return labels


def rec_structure(rec_path):
    """Byte ranges worth aiming at: every part header, the IRHeader + label array + first image bytes of a record."""
    data = open(rec_path, "rb").read()
    spans, pos = [], 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos + 4:pos + 8], "little") & ((1 << 29) - 1)
        spans.append((pos, pos + 8 + min(length, 24 + 8 + 24)))  # part header, IRHeader, labels, JPEG header
        pos += 8 + length + (-length % 4)
    return spans


def make_bin(path, rng, num_pairs=4):
    from eval.verification import write_bin

    images = np.stack([smooth_image(rng) for _ in range(2 * num_pairs)])
    issame = [bool(x) for x in rng.random(num_pairs) < 0.5]
    issame[0], issame[1] = True, False
    write_bin(path, images, issame)
    return issame


def make_files(root):
    from ijb_fixture import make_ijb_fixture

    rng = np.random.default_rng(SEED)
    os.makedirs(os.path.join(root, "rec"))
    labels = make_rec(os.path.join(root, "rec"), rng)
    issame = make_bin(os.path.join(root, "clean.bin"), rng)
    make_ijb_fixture(os.path.join(root, "ijb"), num_ids=3, templates_per_id=2, seed=SEED)
    return {"labels": labels, "issame": issame}


# ---------------------------------------------------------------- readers (run in the child)

def read_rec(root):
    """-> labels {key: label} read through the training dataset, or raises."""
    from dataset import MXFaceDataset

    ds = MXFaceDataset(root, num_classes=NUM_IDS, flip=False)
    keys = [int(k) for k in ds.image_keys]
    return {key: int(ds[i][1]) for i, key in enumerate(keys)}


def read_bin(path):
    from eval.verification import load_bin

    (data, _), issame = load_bin(path)
    return {"issame": issame, "images": int(data.shape[0])}


def read_ijb(root):
    from eval import ijb

    meta = ijb.read_meta(root, "IJBC")
    probe = ijb.read_1n_csv(ijb.meta_paths(root, "IJBC")["probe"])
    rows = [" ".join([meta["names"][i], str(meta["templates"][i]), str(meta["medias"][i])] +
                     [repr(float(v)) for v in meta["landmarks"][i].reshape(-1)] + [repr(float(meta["faceness"][i]))])
            for i in range(len(meta["names"]))]
    pairs = [f"{a} {b} {c}" for a, b, c in zip(meta["t1"], meta["t2"], meta["label"])]
    return {"rows": rows, "pairs": pairs, "probe": [f"{t} {s}" for t, s in zip(*probe)]}


# ---------------------------------------------------------------- cases

def plan(root, clean):
    """-> list of (case id, file kind, file path relative to root, 'flip'|'cut', position, xor mask)."""
    rng = np.random.default_rng(SEED)
    cases = []
    structure = rec_structure(os.path.join(root, "rec", "train.rec"))
    sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in
             ["rec/train.rec", "rec/train.idx", "clean.bin"] + [f"ijb/meta/{m}" for m in META_FILES]}
    bin_raw = open(os.path.join(root, "clean.bin"), "rb").read()
    bool_bytes = [i for i, b in enumerate(bin_raw) if b in (0x88, 0x89)][-len(clean["issame"]):]
    for family, count in COUNTS.items():
        kind, how = family.split("_")
        for _ in range(count):
            rel = {"rec": "rec/train.rec", "idx": "rec/train.idx", "bin": "clean.bin"}.get(kind)
            if kind == "meta":
                rel = f"ijb/meta/{META_FILES[rng.integers(len(META_FILES))]}"
            size = sizes[rel]
            if how == "cut":
                pos = int(rng.integers(0, size))
            elif kind == "rec" and rng.random() < 0.5:
                start, stop = structure[rng.integers(len(structure))]
                pos = int(rng.integers(start, stop))
            elif kind == "bin" and rng.random() < 0.5:
                # the pickle's opcodes: the issame list (a third of these) and the bytes around the images
                structural = list(range(0, 40)) + list(range(size - 40, size))
                pos = int(rng.choice(bool_bytes if rng.random() < 1 / 3 else structural))
            else:
                pos = int(rng.integers(0, size))
            mask = int(rng.integers(1, 256))
            if kind == "bin" and pos in bool_bytes and rng.random() < 0.5:
                mask = 1  # 0x88 <-> 0x89: the one corruption the .bin format cannot detect
            cases.append((f"{family}{len(cases)}", kind, rel, how, pos, mask))
    return cases


def corrupt(root, case, work):
    """Copy the clean file set to `work` with this case's corruption applied; -> path of the corrupted file."""
    _, kind, rel, how, pos, mask = case
    src = os.path.join(root, rel)
    group = os.path.dirname(rel) if kind in ("rec", "idx", "meta") else ""
    for name in (os.listdir(os.path.join(root, group)) if group else [os.path.basename(rel)]):
        data = open(os.path.join(root, group, name), "rb").read()
        if os.path.join(root, group, name) == src:
            data = data[:pos] if how == "cut" else data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:]
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
    return os.path.join(work, os.path.basename(rel))


def run_case(root, clean, case, work):
    """-> (outcome, detail); outcome 'error' (project error naming the file), 'ok', 'limit' (a documented
    undetectable corruption, see the module docstring) or 'BAD'."""
    from eval.verification import BinLoadError
    from utils.recordio import RecordIOError

    _, kind, rel, how, pos, mask = case
    path = corrupt(root, case, work)
    name = os.path.basename(path)
    allowed = {"rec": RecordIOError, "idx": RecordIOError, "bin": BinLoadError, "meta": ValueError}[kind]
    try:
        if kind in ("rec", "idx"):
            got = read_rec(work)
        elif kind == "bin":
            got = read_bin(path)
        else:
            os.makedirs(os.path.join(work, "meta"), exist_ok=True)
            for m in META_FILES:
                os.replace(os.path.join(work, m), os.path.join(work, "meta", m))
            got = read_ijb(work)
    except allowed as e:
        if name not in str(e):
            return "BAD", f"{type(e).__name__} does not name {name}: {e}"
        return "error", f"{type(e).__name__}: {e}"
    except Exception as e:
        return "BAD", f"unexpected {type(e).__name__}: {e}"

    if kind in ("rec", "idx"):
        return ("ok", "") if got == clean["labels"] else ("BAD", f"silently wrong labels {got}")
    if kind == "bin":
        expected = {"issame": clean["issame"], "images": 2 * len(clean["issame"])}
        if got == expected:
            return "ok", ""
        raw = open(os.path.join(root, rel), "rb").read()
        diff = [i for i, (x, y) in enumerate(zip(got["issame"], clean["issame"])) if x != y]
        if (how == "flip" and mask == 1 and raw[pos] in (0x88, 0x89) and got["images"] == expected["images"]
                and len(diff) == 1):
            return "limit", f"pickled bool {diff[0]} flipped"
        return "BAD", f"silently wrong .bin contents {got}"
    ref = clean["ijb"]
    if got == ref:
        return "ok", ""
    # which line of which file was hit
    raw = open(os.path.join(root, rel), "rb").read()
    line = raw[:pos].count(b"\n")
    key = {"ijbc_face_tid_mid.txt": "rows", "ijbc_name_5pts_score.txt": "rows",
           "ijbc_template_pair_label.txt": "pairs", "ijbc_1N_probe_mixed.csv": "probe"}[name]
    others = {k: v for k, v in got.items() if k != key}
    if others != {k: v for k, v in ref.items() if k != key}:
        return "BAD", f"corrupting {name} changed other tables"
    new, old = got[key], ref[key]
    changed = [i for i, (x, y) in enumerate(zip(new, old)) if x != y]
    finite = not any(word in row for row in new for word in ("inf", "nan"))
    if key == "probe":
        # rows are pooled per template (np.unique), so one bad row changes at most one template entry and may add
        # one (a new template id); a cut drops the templates whose rows all followed the cut
        if len(set(new) - set(old)) <= 1 and (how == "cut" or len(set(old) - set(new)) <= 2):
            return "limit", f"{name}: probe templates {sorted(set(new) ^ set(old))} changed"
        return "BAD", f"{name}: probe list {new}"
    hit = len(old) - 1 if how == "cut" else line  # a cut that parses can only have shortened the last line kept
    if how == "cut" and key == "pairs" and len(new) < len(old) and changed in ([], [len(new) - 1]):
        return "limit", f"{name} cut to {len(new)} of {len(old)} pairs"
    if len(new) == len(old) and changed == [hit] and finite:
        return "limit", f"{name} line {hit + 1}: {old[hit]!r} read as {new[hit]!r}"
    return "BAD", f"{name}: rows {changed} (of {len(old)} -> {len(new)}) changed by a {how} at line {line + 1}"


def child(root):
    """Run every case; print one JSON line before (start) and after (result) each."""
    sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
    cv2.setNumThreads(1)
    with open(os.path.join(root, "clean.json")) as f:
        clean = json.load(f)
    clean["labels"] = {int(k): v for k, v in clean["labels"].items()}
    clean["ijb"] = read_ijb(os.path.join(root, "ijb"))
    assert read_rec(os.path.join(root, "rec")) == clean["labels"]
    assert read_bin(os.path.join(root, "clean.bin"))["issame"] == clean["issame"]
    for case in plan(root, clean):
        print(json.dumps({"start": case[0]}), flush=True)
        if case[0] == "rec_flip2" and os.environ.get("FUZZ_SELFTEST") == "crash":
            os.abort()
        if case[0] == "rec_flip2" and os.environ.get("FUZZ_SELFTEST") == "hang":
            time.sleep(3600)
        work = os.path.join(root, f"work{os.getpid()}", case[0])  # per child: the harness self-test reuses root
        os.makedirs(work)
        outcome, detail = run_case(root, clean, case, work)
        print(json.dumps({"case": list(case), "outcome": outcome, "detail": detail[:400]}), flush=True)
    print(json.dumps({"done": True}), flush=True)


# ---------------------------------------------------------------- the test

class ChildFailure(Exception):
    pass


def run_child(root, hang_s=HANG_S, selftest="", startup_s=STARTUP_S):
    """Run the cases in a child; -> list of case reports. Raises ChildFailure naming the case on a hang (no
    report for hang_s seconds once the cases have started; the start itself may take up to startup_s, so a slow
    start on a loaded machine is not mistaken for a hung case) or on the child's death (e.g. a segfault in a
    decoder)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENCV_LOG_LEVEL="ERROR", FUZZ_SELFTEST=selftest)
    with open(os.path.join(root, "child.err"), "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), root], stdout=subprocess.PIPE,
                                stderr=err, env=env)
    out, current, last, pending, done = [], "(startup)", time.monotonic(), b"", False
    try:
        while not done:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    current = msg.get("start", current)
                    if "case" in msg:
                        out.append(msg)
                    done = done or bool(msg.get("done"))
                last = time.monotonic()
            else:
                budget = startup_s if current == "(startup)" else hang_s
                if time.monotonic() - last > budget:
                    raise ChildFailure(f"case {current} hung: no result for {budget} s")
        code = proc.wait(timeout=max(hang_s, startup_s))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if code != 0:
        with open(os.path.join(root, "child.err")) as f:
            raise ChildFailure(f"the reader process died (exit {code}) during case {current}:\n{f.read()[-3000:]}")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz"))
    clean = make_files(root)
    with open(os.path.join(root, "clean.json"), "w") as f:
        json.dump(clean, f)
    return root


@pytest.fixture(scope="module")
def results(files):
    try:
        return run_child(files)
    except ChildFailure as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("selftest,expected", [("crash", r"died \(exit -6\) during case rec_flip2"),
                                               ("hang", "case rec_flip2 hung")])
def test_harness_reports_a_crash_or_a_hang(files, selftest, expected):
    """The guard itself: a child that aborts, or stops reporting, in case rec_flip2 is reported as such. The per-case
    budget is short (the cases before rec_flip2 take milliseconds each); the start keeps its own generous allowance,
    so a slow start on a loaded machine does not turn into "case (startup) hung"."""
    with pytest.raises(ChildFailure, match=expected):
        run_child(os.path.join(files), hang_s=5, selftest=selftest)


def test_all_cases_ran(results):
    assert len(results) == sum(COUNTS.values())


@pytest.mark.parametrize("family", list(COUNTS))
def test_every_case_is_a_clear_error_or_a_correct_read(results, family):
    mine = [r for r in results if r["case"][0].rstrip("0123456789") == family]
    assert len(mine) == COUNTS[family]
    bad = [(r["case"], r["detail"]) for r in mine if r["outcome"] == "BAD"]
    assert bad == [], "\n".join(map(str, bad))
    outcomes = {r["outcome"] for r in mine}
    assert "error" in outcomes  # the corruptions do reach the checks
    if family.endswith("cut") and family != "meta_cut":
        assert outcomes == {"error"}  # a cut .rec/.idx/.bin is always an error


def test_undetectable_cases_are_exactly_the_documented_ones(results):
    limits = [r for r in results if r["outcome"] == "limit"]
    assert all(r["case"][1] in ("bin", "meta") for r in limits)
    for r in limits:
        _, kind, rel, how, pos, mask = r["case"]
        if kind == "bin":
            assert how == "flip" and mask == 1 and "pickled bool" in r["detail"]
    # the .bin limit really occurs in this run (the plan aims at it), so the assertion above is exercised
    assert any(r["case"][1] == "bin" for r in limits)


def test_rec_label_corruption_is_caught_by_identity_ranges(tmp_path):
    """Direct check of the identity-range rule: a label field rewritten to another valid class id."""
    from dataset import MXFaceDataset
    from utils.recordio import RecordIOError

    rng = np.random.default_rng(0)
    make_rec(str(tmp_path), rng)
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    offsets = [int(line.split()[1]) for line in (tmp_path / "train.idx").read_text().split("\n") if line]
    label_at = offsets[1] + 8 + 4  # key 1: part header (8 bytes), IRHeader flag (4 bytes), then the float label
    assert np.frombuffer(raw[label_at:label_at + 4], "<f4")[0] == 0.0
    raw[label_at:label_at + 4] = np.float32(2.0).tobytes()  # class 2 exists: num_classes alone cannot catch it
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    ds = MXFaceDataset(str(tmp_path), num_classes=NUM_IDS, flip=False)
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 1: label 2, but the identity records put this "
                                            r"key in class 0 \(keys 1\.\.4\)"):
        ds[0]
    assert int(ds[1][1]) == 0 and int(ds[4][1]) == 1
    raw[label_at:label_at + 4] = np.float32(0.5).tobytes()
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    with pytest.raises(RecordIOError, match=r"record key 1: label 0.5 is not an integer class id"):
        MXFaceDataset(str(tmp_path), num_classes=NUM_IDS, flip=False)[0]


def test_broken_identity_records_refused(tmp_path):
    from dataset import MXFaceDataset
    from utils.recordio import IRHeader, IndexedRecordWriter, RecordIOError, pack_header

    rng = np.random.default_rng(0)
    make_rec(str(tmp_path), rng)
    # rewrite identity record of class 1 with a gap: [6, 9) instead of [5, 9)
    from utils.recordio import IndexedRecordReader
    reader = IndexedRecordReader(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"))
    records = {k: reader.read_idx(k) for k in reader.keys}
    reader.close()
    records[14] = pack_header(IRHeader(0, [6, 9], 0, 0))
    with IndexedRecordWriter(str(tmp_path / "train.rec"), str(tmp_path / "train.idx")) as w:
        for k, rec in records.items():
            w.write_idx(k, rec)
    with pytest.raises(RecordIOError, match=r"record key 14: identity record of class 1 has labels \[6.0, 9.0\], "
                                            r"expected \[5, end\)"):
        MXFaceDataset(str(tmp_path), num_classes=NUM_IDS)


if __name__ == "__main__":
    child(sys.argv[1])
