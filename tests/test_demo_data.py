"""tools/make_demo_data.py: determinism, RecordIO/.bin/IJB-C formats, and landmarks that match the drawn pixels."""
import csv
import json
import os
import pickle
import pickletools

import cv2
import numpy as np
import pytest

from tools import make_demo_data as demo
from utils.face_align import ARCFACE_REFERENCE as REF
from utils.face_align import estimate_norm
from utils.recordio import IndexedRecordReader, decode_image, image_label, insightface_layout

SIZES = dict(num_train_ids=4, images_per_id=3, num_test_ids=4, bin_pairs=6, templates_per_id=3, progress=False)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.generate(str(root / "a"), seed=3, **SIZES)
    return root


def test_same_seed_byte_identical_other_seed_differs(data):
    demo.generate(str(data / "b"), seed=3, **SIZES)
    demo.generate(str(data / "c"), seed=4, **SIZES)
    a, b, c = _files(data / "a"), _files(data / "b"), _files(data / "c")
    assert len(a) > 20 and a == b
    for name in ("train/train.rec", "train/lfw.bin", "ijbc/loose_crop/1.jpg", "ijbc/meta/ijbc_name_5pts_score.txt"):
        assert a[name] != c[name], name


def test_recordio_insightface_layout(data):
    n, k = SIZES["num_train_ids"], SIZES["images_per_id"]
    a, b = 1 + n * k, 1 + n * k + n
    with open(data / "a/train/property") as f:
        assert f.read() == f"{n},112,112\n"
    with IndexedRecordReader(str(data / "a/train/train.rec"), str(data / "a/train/train.idx")) as r:
        assert len(r) == b and list(r.keys) == list(range(b))
        header, payload = r.read_header(0)
        assert (header.flag, header.label.tolist(), header.id, header.id2, payload) == (2, [a, b], 0, 1, b"")
        keys, num_ids = insightface_layout(r)
        assert list(keys) == list(range(1, a)) and num_ids == n
        for key in range(1, a):
            header, payload = r.read_header(key)
            assert (header.flag, image_label(header), header.id) == (0, (key - 1) // k, key)
            img = decode_image(payload, key)
            assert img.shape == (112, 112, 3) and img.dtype == np.uint8 and img.std() > 10
        for label in range(n):
            header, payload = r.read_header(a + label)
            assert header.flag == 2 and header.label.tolist() == [1 + label * k, 1 + (label + 1) * k]
            assert payload == b""


def test_bin_is_plain_pickle_of_balanced_pairs(data):
    with open(data / "a/train/lfw.bin", "rb") as f:
        raw = f.read()
    # only bytes/list/bool/tuple opcodes: loadable by a restricted unpickler that resolves no globals
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}
    bins, issame = pickle.loads(raw)
    p = SIZES["bin_pairs"]
    assert isinstance(bins, list) and isinstance(issame, list) and len(bins) == 2 * p and len(issame) == p
    assert all(type(s) is bool for s in issame) and issame == [k % 2 == 0 for k in range(p)]
    for b in bins:
        assert type(b) is bytes and b[:3] == b"\xff\xd8\xff"
        assert cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)


def _lines(path):
    with open(path) as f:
        return [line.split() for line in f]


def _csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["TEMPLATE_ID", "SUBJECT_ID"]
    return [(int(r[0]), int(r[1]), r[2]) for r in rows[1:]]


def test_ijbc_meta_consistent(data):
    root = data / "a/ijbc"
    crops = sorted(os.listdir(root / "loose_crop"), key=lambda s: int(s.split(".")[0]))
    tid_mid = _lines(root / "meta/ijbc_face_tid_mid.txt")
    pts = _lines(root / "meta/ijbc_name_5pts_score.txt")
    assert len(crops) == len(tid_mid) == len(pts) and [r[0] for r in tid_mid] == [r[0] for r in pts] == crops
    assert crops == [f"{i}.jpg" for i in range(1, len(crops) + 1)]
    for row, name in zip(pts, crops):
        assert len(row) == 12
        h, w = cv2.imread(str(root / "loose_crop" / name)).shape[:2]
        assert w > 112 and h > 112
        xy = np.array(row[1:11], float).reshape(5, 2)
        assert (xy > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        assert xy[0, 0] < xy[1, 0] and xy[3, 0] < xy[4, 0]  # left before right: in-plane rotation stays < 90 deg
        assert 0 < float(row[11]) <= 1
    media_of = {}
    for _, tid, mid in tid_mid:
        media_of.setdefault(int(tid), set()).add(int(mid))
    n, t = SIZES["num_test_ids"], SIZES["templates_per_id"]
    assert len(media_of) == n * t and max(len(m) for m in media_of.values()) > 1
    # every media belongs to one template
    owners = {}
    for _, tid, mid in tid_mid:
        assert owners.setdefault(mid, tid) == tid
    g1, g2 = _csv(root / "meta/ijbc_1N_gallery_G1.csv"), _csv(root / "meta/ijbc_1N_gallery_G2.csv")
    probes = _csv(root / "meta/ijbc_1N_probe_mixed.csv")
    subject = {}
    for tid, sid, name in g1 + g2 + probes:
        assert subject.setdefault(tid, sid) == sid and [name, str(tid)] == tid_mid[int(name[:-4]) - 1][:2]
    assert set(subject) == set(media_of) and len(g1) + len(g2) + len(probes) == len(tid_mid)
    s1, s2 = {s for _, s, _ in g1}, {s for _, s, _ in g2}
    assert not s1 & s2 and len(s1 | s2) == n == len(set(subject.values()))
    assert {s for _, s, _ in probes} == s1 | s2 and not {t for t, _, _ in probes} & {t for t, _, _ in g1 + g2}
    pairs = [tuple(map(int, r)) for r in _lines(root / "meta/ijbc_template_pair_label.txt")]
    assert len(pairs) == n * t * (n * t - 1) // 2
    for t1, t2, label in pairs:
        assert t1 in media_of and t2 in media_of and label == int(subject[t1] == subject[t2])
    assert sum(p[2] for p in pairs) == n * t * (t - 1) // 2


def test_train_and_test_identities_disjoint(data):
    with open(data / "a/manifest.json") as f:
        manifest = json.load(f)
    splits = manifest["identities"]
    assert len({role for role, _ in splits.values()}) == 3
    assert sorted(manifest["ijbc_subject_to_identity"].values()) == list(range(SIZES["num_test_ids"]))

    def faces(role, count):  # the identities' geometry, as the generator draws it
        return {tuple(np.round([p["iod"], p["eye_y"], p["mouth_w"], p["face_w"]], 6))
                for p in (demo.sample_identity(np.random.default_rng([3, role, i])) for i in range(count))}
    train, lfw, ijbc = (faces(*splits[k]) for k in ("train", "lfw", "ijbc"))
    assert len(train) + len(lfw) + len(ijbc) == len(train | lfw | ijbc)


def _pupil(gray, centre, radius=4):
    """Centroid of the darkest blob (the pupil) in a window around `centre`."""
    x0, y0 = int(round(centre[0])) - radius, int(round(centre[1])) - radius
    win = gray[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1]
    weight = np.maximum(win.min() + 15 - win, 0)
    ys, xs = np.mgrid[0:win.shape[0], 0:win.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum() + (x0, y0)


def _aligned(img, lm):
    matrix = estimate_norm(lm)
    aligned = cv2.warpAffine(img, matrix, (112, 112), borderValue=0)
    gray = cv2.GaussianBlur(cv2.cvtColor(aligned, cv2.COLOR_BGR2GRAY).astype(np.float32), (0, 0), 0.7)
    return gray, lm @ matrix[:, :2].T + matrix[:, 2]


def test_clean_render_pupils_at_landmarks():
    ident = demo.sample_identity(np.random.default_rng(5))
    base = demo.base_layer(ident)
    rng = np.random.default_rng(6)
    errors = []
    for _ in range(5):
        media = demo.sample_media(rng, loose=True)
        media.update(light=0.0, gain=1.0, cast=np.ones(3))
        pose, nuisance = demo.sample_frame(rng, media)
        pose["blink"] = False
        nuisance.update(blur=0.0, noise=0.0, occlude=False)
        affine, size = demo.loose_affine(rng)
        img, lm, _ = demo.render(base, ident, media, pose, nuisance, affine, size)
        np.testing.assert_allclose(lm, demo.apply(affine, demo.landmarks(ident, pose)))
        gray, warped = _aligned(img, lm)
        errors += [np.linalg.norm(_pupil(gray, warped[e]) - warped[e]) for e in (0, 1)]
    assert max(errors) < 0.5, errors


def test_ijbc_landmarks_align_faces_onto_the_template(data):
    root = data / "a/ijbc"
    errors, offsets = [], []
    for row in _lines(root / "meta/ijbc_name_5pts_score.txt"):
        img = cv2.imread(str(root / "loose_crop" / row[0]))
        gray, warped = _aligned(img, np.array(row[1:11], float).reshape(5, 2))
        offsets.append(np.linalg.norm(warped - REF, axis=1).max())
        errors += [np.linalg.norm(_pupil(gray, warped[e]) - warped[e]) for e in (0, 1)]
    # the 5-point fit lands every face near the ArcFace template (identity geometry and pose make the residual)
    assert max(offsets) < 8, offsets
    # and the drawn pupils sit at the listed eye landmarks despite blur, noise, light, occlusion, JPEG
    assert np.median(errors) < 1.0 and np.mean(np.array(errors) < 1.5) > 0.8, errors
