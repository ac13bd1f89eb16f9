"""eval/ijb.py stages and utils/face_align.py against direct loops of the released protocol (docs/evaluation.md)."""
import os
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from eval import ijb
from tests.ijb_fixture import make_ijb_fixture
from utils.face_align import ARCFACE_REFERENCE, estimate_norm, norm_crop


# ------------------------------------------------------------ loop references (1:1 and 1:N, written plainly)

def ref_template_features(img_feats, faceness, templates, medias, flip, mode, norm_score, detector):
    half = img_feats.shape[1] // 2
    if not flip:
        f = img_feats[:, :half]
    elif mode == "add":
        f = img_feats[:, :half] + img_feats[:, half:]
    else:
        f = img_feats
    if not norm_score:
        f = f / np.sqrt(np.sum(f ** 2, -1, keepdims=True))
    if detector:
        f = f * faceness[:, None]
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), f.shape[1]))
    for i, t in enumerate(unique_templates):
        idx = np.where(templates == t)[0]
        media_feats = []
        for m in np.unique(medias[idx]):
            members = idx[medias[idx] == m]
            media_feats.append(f[members[0]] if len(members) == 1 else np.mean(f[members], axis=0))
        out[i] = np.sum(media_feats, axis=0)
    return unique_templates, out / np.linalg.norm(out, axis=1, keepdims=True)


def ref_pair_scores(unique_templates, feats, t1, t2):
    row = {t: i for i, t in enumerate(unique_templates)}
    return np.array([float(np.sum(feats[row[a]] * feats[row[b]])) for a, b in zip(t1, t2)])


def ref_tar(labels, scores, far_targets=ijb.FAR_TARGETS):
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = []
    for x in far_targets:
        _, index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        out.append(tpr[index])
    return np.array(out)


def ref_1n(unique_templates, feats, galleries, probes):
    row = {t: i for i, t in enumerate(unique_templates)}
    probe_ids, probe_subjects = probes
    hits = {k: 0 for k in ijb.RANKS}
    tpir = {x: [] for x in ijb.FPIR_TARGETS}
    for gallery_ids, gallery_subjects in galleries:
        mated, nonmated_best = [], []
        for p, s in zip(probe_ids, probe_subjects):
            sims = [float(feats[row[p]] @ feats[row[g]]) for g in gallery_ids]
            if s in list(gallery_subjects):
                j = list(gallery_subjects).index(s)
                others = [v for i, v in enumerate(sims) if i != j]
                higher = sum(v > sims[j] for v in others)
                for k in ijb.RANKS:
                    hits[k] += higher < k
                mated.append((sims[j], max(others)))
            else:
                nonmated_best.append(max(sims))
        nonmated_best = sorted(nonmated_best, reverse=True)
        for x in ijb.FPIR_TARGETS:
            threshold = nonmated_best[max(int(len(nonmated_best) * x), 1) - 1]
            tp = sum(1 for m, o in mated if m > o and m > threshold)
            tpir[x].append(tp / len(mated))
    out = {f"rank-{k}": hits[k] / len(probe_ids) for k in ijb.RANKS}
    out.update({f"TPIR@FPIR={x:g}": np.mean(tpir[x]) for x in ijb.FPIR_TARGETS})
    return out


def random_layout(rng, n_images=500, n_templates=60, dim=16):
    templates = rng.choice(np.arange(1, 10 * n_templates, 10), n_images)  # non-contiguous ids, unsorted
    medias = rng.integers(0, 6, n_images) * 7 + 3  # shared across templates: pooled within a template only
    feats = rng.standard_normal((n_images, 2 * dim)).astype(np.float32)
    faceness = rng.uniform(0.3, 1.0, n_images).astype(np.float32)
    return feats, faceness, templates, medias


# ---------------------------------------------------------------- stages

@pytest.mark.parametrize("flip,mode,norm_score,detector", [
    (True, "add", True, True), (True, "add", False, True), (True, "concat", True, False),
    (False, "add", False, False), (True, "concat", False, True), (False, "add", True, True)])
def test_template_features_match_loop(flip, mode, norm_score, detector):
    rng = np.random.default_rng(1)
    feats, faceness, templates, medias = random_layout(rng)
    got_ids, got = ijb.image_to_template_features(feats, faceness, templates, medias, flip, mode, norm_score,
                                                  detector, chunk_rows=37, workers=3)
    want_ids, want = ref_template_features(feats, faceness, templates, medias, flip, mode, norm_score, detector)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert got.shape == want.shape == (len(want_ids), feats.shape[1] if (flip and mode == "concat") else 16)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_norm_score_switch_semantics():
    # use_norm_score=True keeps the raw norm as a weight: a template of one long and one short media vector
    # points towards the long one; False (L2-normalised images) gives the bisector.
    feats = np.array([[10.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=np.float32)
    args = (np.ones(2, np.float32), np.array([5, 5]), np.array([1, 2]))
    _, kept = ijb.image_to_template_features(feats, *args, use_flip_test=False, use_norm_score=True,
                                             use_detector_score=False)
    _, normed = ijb.image_to_template_features(feats, *args, use_flip_test=False, use_norm_score=False,
                                               use_detector_score=False)
    np.testing.assert_allclose(kept[0], np.array([10, 1]) / np.sqrt(101), atol=1e-12)
    np.testing.assert_allclose(normed[0], np.array([1, 1]) / np.sqrt(2), atol=1e-12)


def pair_layout(rng, shape, n_templates=700, n_pairs=6000, dim=16):
    """Normalised template features with non-contiguous ids and pairs of one of IJB-C's two shapes, plus
    duplicate pairs, swapped pairs and a template paired with itself (ties among the scores)."""
    ids = np.sort(rng.choice(np.arange(3, 40 * n_templates, 3), n_templates, replace=False))
    feats = rng.standard_normal((n_templates, dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    if shape == "enrollment x probe":  # enrollment ids interleave with the probes' ids; grouped like the real file
        enrolled = rng.choice(n_templates, n_templates // 6, replace=False)
        probes = np.setdiff1d(np.arange(n_templates), enrolled)
        i1, i2 = rng.choice(enrolled, n_pairs), rng.choice(probes, n_pairs)
        order = np.lexsort((i2, i1))
        i1, i2 = i1[order], i2[order]
    else:
        i1, i2 = rng.integers(0, n_templates, n_pairs), rng.integers(0, n_templates, n_pairs)
    i1 = np.concatenate([i1, i1[:500], i2[:500], i1[:50]])  # duplicates, swapped pairs, self pairs
    i2 = np.concatenate([i2, i2[:500], i1[:500], i1[:50]])
    return ids, feats, ids[i1], ids[i2]


@pytest.mark.parametrize("shape", ["enrollment x probe", "random"])
@pytest.mark.parametrize("tile", [7, 64, 512])
def test_pair_scores_match_loop(shape, tile):
    rng = np.random.default_rng(2)
    ids, feats, t1, t2 = pair_layout(rng, shape)
    scores = ijb.pair_scores(ids, feats, t1, t2, tile=tile)
    np.testing.assert_allclose(scores, ref_pair_scores(ids, feats, t1, t2), rtol=0, atol=1e-13)
    # a pair, its duplicate and its swap are one matrix entry: exactly equal scores
    np.testing.assert_array_equal(scores[6000:6500], scores[:500])
    np.testing.assert_array_equal(scores[6500:7000], scores[:500])


@pytest.mark.parametrize("shape", ["enrollment x probe", "random"])
def test_scores_to_tar_match_release_pipeline(shape):
    rng = np.random.default_rng(3)
    ids, feats, t1, t2 = pair_layout(rng, shape)
    row = {t: i for i, t in enumerate(ids)}
    # labels from a subject per template: pairs whose scores differ only by rounding (a pair and its
    # duplicate or swap, a template with itself) share a label, so float64 rounding cannot reorder the ROC
    labels = np.array([row[a] % 5 == row[b] % 5 for a, b in zip(t1, t2)], dtype=np.int64)
    scores = ijb.pair_scores(ids, feats, t1, t2, tile=64)
    tar, fpr, tpr = ijb.tar_at_far(labels, scores, far_targets=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3))
    want = ref_pair_scores(ids, feats, t1, t2)
    np.testing.assert_array_equal(tar, ref_tar(labels, want, far_targets=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3)))
    # the whole curve equals sklearn's on the same scores (rounding-level ties may merge or split points
    # between two score computations, which moves no TAR but changes the number of points)
    want_fpr, want_tpr, _ = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)


def roc_cases():
    rng = np.random.default_rng(4)
    labels = (rng.uniform(size=30000) < 0.2).astype(np.int64)
    yield "continuous", labels, rng.normal(labels * 0.8, 0.5)
    for decimals in (0, 1, 2, 3):  # coarse scores: many ties mixing genuine and impostor pairs
        yield f"rounded to {decimals}", labels, np.round(rng.normal(labels * 0.8, 0.5), decimals)
    # runs of ties with changing and repeating counts (collinear points that roc_curve drops)
    yield "repeating tie counts", labels[:3000], np.repeat(np.arange(1000.0), 3)[rng.permutation(3000)] % 37
    yield "one genuine, one value", np.r_[1, np.zeros(99, np.int64)], np.zeros(100)
    yield "signed zeros", np.array([1, 0, 1, 0, 0, 1]), np.array([0.0, -0.0, 2.0, -1.0, 1, -0.0])
    yield "two pairs", np.array([0, 1]), np.array([0.3, 0.2])
    many = (rng.uniform(size=2 ** 20 + 1) < 0.01).astype(np.int64)  # large enough to sort on two threads
    yield "a million scores, ties", many, np.round(rng.normal(many * 0.8, 0.3), 4)


@pytest.mark.parametrize("name,labels,scores", list(roc_cases()), ids=[c[0] for c in roc_cases()])
def test_roc_equals_sklearn_roc_curve(name, labels, scores):
    fpr, tpr = ijb.roc(labels, scores)
    want_fpr, want_tpr, _ = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    far_targets = (1e-3, 0.01, 0.02, 0.1, 0.25, 0.5)
    np.testing.assert_array_equal(ijb.tar_at_far(labels, scores, far_targets)[0],
                                  ref_tar(labels, scores, far_targets))


def test_sort_on_two_cores_equals_np_sort():
    rng = np.random.default_rng(5)
    values = rng.normal(size=2 ** 20 + 3)
    values[::7] = np.round(values[::7], 1)  # ties
    values[[1, 2, 3]] = [0.0, -0.0, np.inf]
    np.testing.assert_array_equal(ijb.sort_on_two_cores(values), np.sort(values))
    values[5] = np.nan
    np.testing.assert_array_equal(ijb.sort_on_two_cores(values), np.sort(values))


def test_roc_needs_both_classes_and_finite_scores():
    with pytest.raises(ValueError, match="both genuine"):
        ijb.roc(np.zeros(4, np.int64), np.arange(4.0))
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="must be finite"):
            ijb.roc(np.array([0, 1, 0]), np.array([0.5, bad, 0.1]))


@pytest.mark.parametrize("seed", range(4))
def test_tar_point_selection_with_ties(seed):
    # coarse scores give many tied thresholds and equal |FPR - target| distances: ties must go to larger TPR
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=20000) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(labels * 0.6, 0.4), 1)
    tar, _, _ = ijb.tar_at_far(labels, scores)
    np.testing.assert_array_equal(tar, ref_tar(labels, scores))


def test_tar_tie_goes_to_larger_tpr():
    # fpr points 0, 0.5, 1: target 0.25 is equally far from 0 and 0.5 -> the 0.5 point (larger TPR) wins
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    tar, fpr, tpr = ijb.tar_at_far(labels, scores, far_targets=(0.25,))
    assert list(fpr) == [0, 0, 0.5, 0.5, 1] and tar[0] == 1.0
    np.testing.assert_allclose(tar, [tpr[np.flatnonzero(fpr == 0.5).max()]])


@pytest.mark.parametrize("known", [np.array([1, 2]), np.array([1, 2 ** 40])])  # lookup table / binary search
def test_unknown_pair_template_is_an_error(known):
    for unknown in (99, -5, 2 ** 41):
        with pytest.raises(ValueError, match=f"pair template id {unknown} has no images"):
            ijb.pair_scores(known, np.eye(2), np.array([1, unknown]), np.array([1, 1]))


def test_identification_1n_matches_loop():
    rng = np.random.default_rng(3)
    n_subjects, n_templates = 12, 80
    ids = np.arange(n_templates) * 3 + 5
    subjects = np.concatenate([np.arange(n_subjects), rng.integers(0, n_subjects + 6, n_templates - n_subjects)])
    centres = rng.standard_normal((n_subjects + 6, 8))
    feats = centres[subjects] + 1.2 * rng.standard_normal((n_templates, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    galleries = [(ids[:6], subjects[:6]), (ids[6:12], subjects[6:12])]
    probes = (ids[12:], subjects[12:])  # includes subjects enrolled nowhere (12..17)
    got = ijb.identification_1n(ids, feats, galleries, probes)
    want = ref_1n(ids, feats, galleries, probes)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["rank-1"] < got["rank-10"] <= 1


# ---------------------------------------------------------------- alignment

def random_landmarks(rng, n_points=5):
    scale, angle = rng.uniform(0.6, 2.0), rng.uniform(-0.5, 0.5)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ARCFACE_REFERENCE @ rot.T + rng.uniform(0, 60, 2)


@pytest.mark.parametrize("seed", range(5))
def test_estimated_transform_maps_landmarks_onto_reference(seed):
    landmarks = random_landmarks(np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated estimate() API would raise a FutureWarning here
        matrix = estimate_norm(landmarks)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_REFERENCE, atol=1e-6)
    np.testing.assert_allclose(estimate_norm(landmarks, 224)[:, 2] / 2, matrix[:, 2], atol=1e-6)


def test_norm_crop_puts_marked_points_on_reference():
    rng = np.random.default_rng(7)
    landmarks = random_landmarks(rng)
    img = np.zeros((260, 260, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    aligned = norm_crop(img, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    gray = aligned[..., 0].astype(np.float64)
    for rx, ry in ARCFACE_REFERENCE:
        x0, y0 = int(rx) - 6, int(ry) - 6
        patch = gray[y0:y0 + 13, x0:x0 + 13]
        ys, xs = np.mgrid[y0:y0 + 13, x0:x0 + 13]
        cx, cy = (patch * xs).sum() / patch.sum(), (patch * ys).sum() / patch.sum()
        assert abs(cx - rx) < 1.0 and abs(cy - ry) < 1.0
    assert aligned[0, 0].tolist() == [0, 0, 0]  # border 0


def test_68_points_reduce_to_5():
    rng = np.random.default_rng(8)
    five = random_landmarks(rng)
    pts = rng.uniform(0, 200, (68, 2))
    pts[36], pts[39] = five[0] - 3, five[0] + 3
    pts[42], pts[45] = five[1] + [2, 1], five[1] - [2, 1]
    pts[30], pts[48], pts[54] = five[2], five[3], five[4]
    img = rng.integers(0, 256, (220, 220, 3), dtype=np.uint8)
    np.testing.assert_allclose(estimate_norm(pts), estimate_norm(five), atol=1e-9)
    np.testing.assert_array_equal(norm_crop(img, pts), norm_crop(img, five))
    with pytest.raises(ValueError, match=r"\[5,2\] or \[68,2\]"):
        norm_crop(img, pts[:4])


# ---------------------------------------------------------------- images, embedding

@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijbc"))
    info = make_ijb_fixture(root)
    return root, info


def test_read_meta_on_fixture(fixture_dir):
    root, info = fixture_dir
    meta = ijb.read_meta(root, "IJBC")
    assert len(meta["names"]) == info["num_images"] and meta["landmarks"].shape == (info["num_images"], 5, 2)
    assert sorted(set(meta["templates"].tolist())) == info["template_ids"]
    assert len(meta["label"]) == info["num_pairs"] and meta["label"].sum() == 12
    assert meta["faceness"].dtype == np.float32 and meta["t1"].dtype == np.int64
    ids, subjects = ijb.read_1n_csv(os.path.join(root, "meta", "ijbc_1N_gallery_G1.csv"))
    assert ids.tolist() == [100, 121] and subjects.tolist() == [1000, 1001]


def test_image_dataset_aligns_flips_and_normalises(fixture_dir):
    root, _ = fixture_dir
    meta = ijb.read_meta(root)
    dataset = ijb.IJBImages(os.path.join(root, "loose_crop"), meta["names"], meta["landmarks"])
    item = dataset[3]
    img = cv2.imread(os.path.join(root, "loose_crop", meta["names"][3]))
    rgb = cv2.cvtColor(norm_crop(img, meta["landmarks"][3]), cv2.COLOR_BGR2RGB)
    want = (rgb.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5
    assert item.shape == (2, 3, 112, 112) and item.dtype == torch.float32
    np.testing.assert_allclose(item[0].numpy(), want, atol=1e-6)
    np.testing.assert_array_equal(item[1].numpy(), want[:, :, ::-1])


def test_embed_returns_embedding_then_flip_embedding():
    images = torch.randn(7, 2, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    loader = torch.utils.data.DataLoader(list(images), batch_size=3)
    feats = ijb.embed(model, loader, "cpu")
    with torch.no_grad():
        want = torch.cat([model(images[:, 0]), model(images[:, 1])], 1).numpy()
    assert feats.shape == (7, 10) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want, atol=1e-5)


def test_missing_image_names_path_and_line(tmp_path):
    root = str(tmp_path / "ijbc")
    make_ijb_fixture(root, num_ids=2, templates_per_id=2)
    os.remove(os.path.join(root, "loose_crop", "3.jpg"))
    meta = ijb.read_meta(root)
    dataset = ijb.IJBImages(os.path.join(root, "loose_crop"), meta["names"], meta["landmarks"])
    with pytest.raises(FileNotFoundError, match=r"3\.jpg \(meta line 3\)"):
        dataset[2]


# ---------------------------------------------------------------- bad meta

def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def small_meta(tmp_path):
    root = str(tmp_path / "ijbc")
    make_ijb_fixture(root, num_ids=2, templates_per_id=2)
    return root, os.path.join(root, "meta", "ijbc_")


def edit_line(path, number, new):
    lines = open(path).read().splitlines()
    lines[number - 1] = new
    write(path, "\n".join(lines) + "\n")


def test_missing_meta_file(small_meta):
    root, meta = small_meta
    os.remove(meta + "template_pair_label.txt")
    with pytest.raises(FileNotFoundError, match="ijbc_template_pair_label.txt"):
        ijb.read_meta(root)
    shutil.rmtree(os.path.join(root, "meta"))
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        ijb.read_meta(root)


@pytest.mark.parametrize("suffix,line,text,message", [
    ("face_tid_mid.txt", 4, "4.jpg 100", r"face_tid_mid.txt:4: expected 3 fields .*got 2 fields"),
    ("face_tid_mid.txt", 2, "2.jpg 100 abc", r"face_tid_mid.txt:2: non-numeric"),
    ("template_pair_label.txt", 3, "100 107", r"template_pair_label.txt:3: expected 3 fields, got 2"),
    ("template_pair_label.txt", 5, "100 107 1 0", r"template_pair_label.txt:5: expected 3 fields, got 4"),
    ("template_pair_label.txt", 2, "100 x 1", r"template_pair_label.txt:2: non-numeric"),
    ("template_pair_label.txt", 6, "100 107 2", r"label must be 0 or 1"),
    ("name_5pts_score.txt", 5, "5.jpg 1 2 3 4 5 6 7 8 0.9", r"name_5pts_score.txt:5: expected .*5 or 68 landmark"),
    ("name_5pts_score.txt", 2, "2.jpg 1 2 3 4 5 6 7 8 9 nan? 0.9", r"name_5pts_score.txt:2: non-numeric"),
    ("name_5pts_score.txt", 3, "3.jpg " + " ".join(["1"] * 136) + " 0.9",
     r"name_5pts_score.txt:3: 138 fields, earlier lines have 12"),
])
def test_bad_meta_line_names_file_and_line(small_meta, suffix, line, text, message):
    root, meta = small_meta
    edit_line(meta + suffix, line, text)
    with pytest.raises(ValueError, match=message):
        ijb.read_meta(root)


def test_meta_line_counts_must_agree(small_meta):
    root, meta = small_meta
    lines = open(meta + "name_5pts_score.txt").read().splitlines()
    write(meta + "name_5pts_score.txt", "\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"name_5pts_score.txt has \d+ lines but .*face_tid_mid.txt has \d+"):
        ijb.read_meta(root)


def test_meta_image_names_must_agree(small_meta):
    root, meta = small_meta
    edit_line(meta + "name_5pts_score.txt", 2, "x.jpg " + " ".join(["50"] * 10) + " 0.9")
    with pytest.raises(ValueError, match=r"name_5pts_score.txt:2: image 'x.jpg'"):
        ijb.read_meta(root)


def test_68_point_meta_is_read(small_meta):
    root, meta = small_meta
    lines = open(meta + "name_5pts_score.txt").read().splitlines()
    write(meta + "name_5pts_score.txt", "".join(
        f"{line.split()[0]} {' '.join(['7.5'] * 136)} 0.5\n" for line in lines))
    names, landmarks, scores = ijb.read_name_5pts_score(meta + "name_5pts_score.txt")
    assert landmarks.shape == (len(lines), 68, 2) and np.all(landmarks == 7.5) and np.all(scores == 0.5)


def test_bad_1n_csv(small_meta):
    _, meta = small_meta
    write(meta + "1N_probe_mixed.csv", "TEMPLATE_ID,SUBJECT_ID\n1,2\n3\n")
    with pytest.raises(ValueError, match=r"1N_probe_mixed.csv:3: expected at least"):
        ijb.read_1n_csv(meta + "1N_probe_mixed.csv")


@pytest.mark.parametrize("suffix", ["face_tid_mid.txt", "name_5pts_score.txt", "template_pair_label.txt",
                                    "1N_probe_mixed.csv"])
def test_non_utf8_byte_names_file_and_line(small_meta, suffix):
    """A byte that is not UTF-8 is a ValueError naming the file and line, not a bare UnicodeDecodeError."""
    root, meta = small_meta
    raw = open(meta + suffix, "rb").read().split(b"\n")
    raw[2] = raw[2][:1] + b"\xff" + raw[2][1:]  # line 3
    with open(meta + suffix, "wb") as f:
        f.write(b"\n".join(raw))
    with pytest.raises(ValueError, match=rf"ijbc_{suffix.replace('.', '[.]')}:3: not UTF-8 text") as info:
        if suffix.endswith(".csv"):
            ijb.read_1n_csv(meta + suffix)
        else:
            ijb.read_meta(root)
    assert not isinstance(info.value, UnicodeDecodeError)


def test_malformed_1n_csv_names_file(small_meta):
    """csv.Error (here: a field over csv.field_size_limit, e.g. a lost closing quote) names the file and line."""
    import csv

    _, meta = small_meta
    write(meta + "1N_probe_mixed.csv", "TEMPLATE_ID,SUBJECT_ID\n1,2\n3," + "4" * (csv.field_size_limit() + 1) + "\n")
    with pytest.raises(ValueError, match=r"1N_probe_mixed.csv:3: malformed csv: field larger than field limit") as info:
        ijb.read_1n_csv(meta + "1N_probe_mixed.csv")
    assert not isinstance(info.value, csv.Error)
