"""IJB-B / IJB-C 1:1 verification and 1:N identification, one pure function per stage (protocol: docs/evaluation.md).

read_meta -> IJBImages (DataLoader) -> embed -> image_to_template_features -> pair_scores -> tar_at_far
                                                                            -> identification_1n
"""
import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import scipy.sparse
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from utils.cli import UserError
from utils.face_align import norm_crop

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


class MetaFileError(UserError):
    """An IJB meta file is malformed or inconsistent with another; the message names the file and the line."""


def meta_paths(ijb_dir, target):
    prefix = os.path.join(ijb_dir, "meta", target.lower())
    return {
        "face_tid_mid": f"{prefix}_face_tid_mid.txt",
        "template_pair_label": f"{prefix}_template_pair_label.txt",
        "name_5pts_score": f"{prefix}_name_5pts_score.txt",
        "gallery": [f"{prefix}_1N_gallery_{g}.csv" for g in GALLERIES[target]],
        "probe": f"{prefix}_1N_probe_mixed.csv",
    }


def _require(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing IJB meta file: {path}")


def _split_lines(path):
    """Yield (line_number, fields) for every non-empty line. Read as bytes and decoded line by line, so a byte that
    is not UTF-8 is reported with its file and line instead of as a bare UnicodeDecodeError."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MetaFileError(f"{path}:{number}: not UTF-8 text") from None
            fields = line.split()
            if fields:
                yield number, fields


def _numbers(path, number, fields, kind):
    try:
        return [kind(v) for v in fields]
    except ValueError:
        raise MetaFileError(f"{path}:{number}: non-numeric value in {' '.join(fields)!r}") from None


def _check_line(path, number, fields, n_fields):
    if len(fields) != n_fields:
        raise MetaFileError(f"{path}:{number}: expected {n_fields} fields, got {len(fields)}")


def _first_column(path, allowed_counts, describe):
    """Names in the first column; every line's field count must be one of `allowed_counts` and equal to the
    first line's. Only the names are kept, so the numbers can then be parsed by numpy's C reader."""
    names, n_fields = [], None
    for number, fields in _split_lines(path):
        if len(fields) not in allowed_counts:
            raise MetaFileError(f"{path}:{number}: expected {describe}, got {len(fields)} fields")
        if n_fields is not None and len(fields) != n_fields:
            raise MetaFileError(f"{path}:{number}: {len(fields)} fields, earlier lines have {n_fields}")
        n_fields = len(fields)
        names.append(fields[0])
    return names, n_fields


def _load_numbers(path, n_fields, dtype, first=1):
    """Columns first..n_fields-1 as a [lines, n] array; a parse failure is located by a line-by-line rescan."""
    try:
        return np.loadtxt(path, dtype=dtype, usecols=range(first, n_fields), ndmin=2, comments=None)
    except ValueError as error:
        kind = int if np.issubdtype(dtype, np.integer) else float
        for number, fields in _split_lines(path):
            _numbers(path, number, fields[first:], kind)
        raise MetaFileError(f"{path}: {error}") from None


def read_face_tid_mid(path):
    """`image_name template_id media_id` -> (names [N] list, templates [N] int64, medias [N] int64)."""
    _require(path)
    names, _ = _first_column(path, (3,), "3 fields (image_name template_id media_id)")
    ids = _load_numbers(path, 3, np.int64) if names else np.zeros((0, 2), np.int64)
    return names, np.ascontiguousarray(ids[:, 0]), np.ascontiguousarray(ids[:, 1])


def read_template_pair_label(path):
    """`template_id_1 template_id_2 label` -> int64 arrays (t1, t2, label).

    15.6 M lines at IJB-C scale: parsed by numpy's C reader; only on failure is the file rescanned line by
    line to name the offending line."""
    _require(path)
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as error:
        for number, fields in _split_lines(path):
            _check_line(path, number, fields, 3)
            _numbers(path, number, fields, int)
        raise MetaFileError(f"{path}: {error}") from None
    if table.shape[1] != 3:
        raise MetaFileError(f"{path}:1: expected 3 fields, got {table.shape[1]}")
    bad = (table[:, 2] != 0) & (table[:, 2] != 1)
    if bad.any():
        number = int(np.flatnonzero(bad)[0]) + 1
        raise MetaFileError(f"{path}: data line {number}: label must be 0 or 1, got {table[number - 1, 2]}")
    return table[:, 0], table[:, 1], table[:, 2]


def read_name_5pts_score(path):
    """`image_name x1 y1 ... xK yK score` with K = 5 or 68 -> (names, landmarks [N,K,2] float32, scores [N] float32)."""
    _require(path)
    names, n_fields = _first_column(path, (12, 138), "an image name, 5 or 68 landmark points (x y) and a score "
                                                     "(12 or 138 fields)")
    rows = _load_numbers(path, n_fields, np.float32) if names else np.zeros((0, 11), np.float32)
    return names, rows[:, :-1].reshape(len(names), -1, 2), np.ascontiguousarray(rows[:, -1])


def read_meta(ijb_dir, target="IJBC"):
    """All 1:1 meta of `ijb_dir` as a dict of arrays; line-aligned files are checked against each other."""
    paths = meta_paths(ijb_dir, target)
    names, templates, medias = read_face_tid_mid(paths["face_tid_mid"])
    lmk_names, landmarks, faceness = read_name_5pts_score(paths["name_5pts_score"])
    if len(lmk_names) != len(names):
        raise MetaFileError(f"{paths['name_5pts_score']} has {len(lmk_names)} lines but {paths['face_tid_mid']} "
                            f"has {len(names)}; they must be aligned line by line")
    for number, (a, b) in enumerate(zip(names, lmk_names), 1):
        if a != b:
            raise MetaFileError(f"{paths['name_5pts_score']}:{number}: image {b!r} but {paths['face_tid_mid']}:"
                                f"{number} names {a!r}; the files must be aligned line by line")
    t1, t2, label = read_template_pair_label(paths["template_pair_label"])
    return dict(names=names, templates=templates, medias=medias, landmarks=landmarks, faceness=faceness,
                t1=t1, t2=t2, label=label)


def read_1n_csv(path):
    """1:N csv (header row, then TEMPLATE_ID,SUBJECT_ID,...) -> per-template (template_ids, subject_ids)."""
    _require(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        number = raw.count(b"\n", 0, error.start) + 1
        raise MetaFileError(f"{path}:{number}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as error:
        raise MetaFileError(f"{path}:{reader.line_num}: malformed csv: {error}") from None
    ids = []
    for number, fields in enumerate(rows[1:], 2):
        if len(fields) < 2:
            raise MetaFileError(f"{path}:{number}: expected at least TEMPLATE_ID,SUBJECT_ID, got {len(fields)} fields")
        ids.append(_numbers(path, number, fields[:2], int))
    ids = np.array(ids, dtype=np.int64).reshape(-1, 2)
    # The csv has one row per image; a template appears on several rows with the same subject.
    templates, first = np.unique(ids[:, 0], return_index=True)
    return templates, ids[first, 1]


class IJBImages(torch.utils.data.Dataset):
    """Aligned image and its horizontal flip, normalised to [-1, 1]: item -> float32 [2, 3, S, S]."""

    def __init__(self, image_dir, names, landmarks, image_size=112):
        self.image_dir, self.names, self.landmarks, self.image_size = image_dir, names, landmarks, image_size

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        path = os.path.join(self.image_dir, self.names[index])
        img = cv2.imread(path)
        if img is None:
            raise FileNotFoundError(f"cannot read image {path} (meta line {index + 1})")
        aligned = cv2.cvtColor(norm_crop(img, self.landmarks[index], self.image_size), cv2.COLOR_BGR2RGB)
        pair = np.stack([aligned, aligned[:, ::-1]]).transpose(0, 3, 1, 2).astype(np.float32)
        return torch.from_numpy((pair / 255.0 - 0.5) / 0.5)


@torch.inference_mode()
def embed(model, loader, device, amp_dtype=None):
    """Run `model` (a callable on a [B,3,S,S] tensor) over an IJBImages loader (in order, no shuffle)
    -> float32 [N, 2F] = [emb | emb_flip]; F comes from the model's output."""
    feats, start = None, 0
    for batch in tqdm(loader, desc="embedding", unit="batch", dynamic_ncols=True):
        b = batch.shape[0]
        batch = batch.reshape(2 * b, *batch.shape[2:]).to(device, non_blocking=True)  # interleaved orig, flip
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            emb = model(batch)
        emb = emb.float().reshape(b, -1).cpu().numpy()
        if feats is None:  # preallocated once: a list of chunks would double the peak at IJB-C scale
            feats = np.empty((len(loader.dataset), emb.shape[1]), dtype=np.float32)
        feats[start:start + b] = emb
        start += b
    return feats


def image_to_template_features(img_feats, faceness, templates, medias, use_flip_test=True, flip_mode="add",
                               use_norm_score=True, use_detector_score=True, chunk_rows=512,
                               workers=None):
    """Image features [N, 2F] -> (sorted unique template ids [T], L2-normalised template features [T, D] float64).

    As the release's eval_ijbc.py: flip add/concat, `use_norm_score=True` keeps the raw norm (False
    L2-normalises each image), detector score weighting, mean over a media's images within a template, sum
    over the template's media. The media mean and the template sum are one weighted sum per template (weight
    1/|media| per image), taken over the images sorted by template in chunks of `chunk_rows` rows in reused
    buffers that stay in cache; no full-size copy of the features is made (`img_feats` may be a memory map).
    `workers` threads (default: one per CPU) each pool a range of whole templates."""
    img_feats = np.asarray(img_feats)
    n, width = img_feats.shape
    half = width // 2
    if flip_mode not in ("add", "concat"):
        raise ValueError(f"flip_mode must be 'add' or 'concat', got {flip_mode!r}")
    order = np.lexsort((medias, templates))  # images grouped by template, then by media
    sorted_templates, sorted_medias = np.asarray(templates)[order], np.asarray(medias)[order]
    new_template = np.r_[True, sorted_templates[1:] != sorted_templates[:-1]]
    new_media = new_template | np.r_[True, sorted_medias[1:] != sorted_medias[:-1]]
    media_sizes = np.diff(np.r_[np.flatnonzero(new_media), n])
    weights = np.repeat(1.0 / media_sizes, media_sizes)
    template_of_image = np.cumsum(new_template) - 1
    unique_templates = sorted_templates[new_template]
    dim = width if (use_flip_test and flip_mode == "concat") else half
    template_feats = np.zeros((len(unique_templates), dim), dtype=np.float64)
    faceness = np.asarray(faceness, dtype=np.float32)

    def pool_images(first, last):  # sorted images first..last-1, whole templates only
        raw = np.empty((chunk_rows, width), dtype=np.float32)
        combined = np.empty((chunk_rows, dim), dtype=np.float32)
        weighted = np.empty((chunk_rows, dim), dtype=np.float64)
        for start in range(first, last, chunk_rows):
            rows = order[start:min(start + chunk_rows, last)]
            m = len(rows)
            np.take(img_feats, rows, axis=0, out=raw[:m])
            if not use_flip_test:
                f = raw[:m, :half]
            elif flip_mode == "add":
                f = np.add(raw[:m, :half], raw[:m, half:], out=combined[:m])
            else:
                f = raw[:m]
            if not use_norm_score:
                f = f / np.sqrt(np.sum(f ** 2, -1, keepdims=True))
            if use_detector_score:
                f = np.multiply(f, faceness[rows, None], out=combined[:m])
            w = np.multiply(f, weights[start:start + m, None], out=weighted[:m])  # float64 from here
            # one partial sum per template in the chunk (a template may continue in the next chunk), as a
            # [templates, m] 0/1 sparse product (np.add.reduceat over rows is several times slower)
            firsts = np.flatnonzero(np.r_[True, new_template[start + 1:start + m]])
            segments = scipy.sparse.csr_matrix((np.ones(m), np.arange(m), np.r_[firsts, m]), shape=(len(firsts), m))
            template_feats[template_of_image[start + firsts]] += segments @ w

    # one range of whole templates per core: the ranges write disjoint rows of template_feats
    workers = workers or os.cpu_count() or 1
    template_starts = np.r_[np.flatnonzero(new_template), n]
    cuts = template_starts[np.searchsorted(template_starts, np.arange(workers + 1) * n // workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(pool_images, cuts[:-1], cuts[1:]))
    norms = np.linalg.norm(template_feats, axis=1, keepdims=True)
    return unique_templates, template_feats / np.maximum(norms, np.finfo(np.float64).tiny)


def template_rows(unique_templates, ids, what="template"):
    """Row of each id in the sorted `unique_templates`; an unknown id is an error.

    Non-negative ids of moderate size (IJB's are < 200,000) go through a lookup table: one gather per id
    instead of a binary search, which matters for the 15.7 M pair ids of IJB-C. Other ids: np.searchsorted."""
    ids = np.asarray(ids)
    if len(ids) and ids.min() >= 0 and ids.max() < 64 * len(unique_templates) + 2 ** 20:
        top = int(ids.max())
        lo, hi = np.searchsorted(unique_templates, [0, top + 1])  # the templates an id can name
        table = np.full(top + 1, -1, dtype=np.int64)
        table[unique_templates[lo:hi]] = np.arange(lo, hi)
        rows = table[ids]
        bad = rows < 0
    else:
        rows = np.searchsorted(unique_templates, ids).clip(0, max(len(unique_templates) - 1, 0))
        bad = unique_templates[rows] != ids if len(unique_templates) else np.ones(len(ids), bool)
    if bad.any():
        raise MetaFileError(f"{what} id {int(ids[bad][0])} has no images in face_tid_mid "
                            f"({int(bad.sum())} unknown ids)")
    return rows


def pair_scores(unique_templates, template_feats, t1, t2, tile=512, workers=None):
    """Cosine score of each template pair (dot product of the L2-normalised features), float64.

    Scoring pair by pair gathers two 4 KiB rows per pair from a feature table larger than the caches, which is
    memory-bound (15.7 M pairs at IJB-C size). Instead the pairs are grouped by tile of `tile` x `tile`
    templates and each tile that holds pairs is one float64 matrix product, from which the pairs' entries are
    picked. The templates that occur as a first template are put first, so IJB-C's enrollment x probe pairs
    fill one rectangle of tiles whatever the template ids are, and a pair is scored as (lower row, higher row)
    since a dot product is symmetric, so randomly paired templates fill one triangle. The scores equal
    per-pair dot products up to float64 rounding (~1e-16). `workers`: threads, by default one per CPU."""
    feats = np.ascontiguousarray(template_feats, dtype=np.float64)
    r1 = template_rows(unique_templates, t1, "pair template")
    r2 = template_rows(unique_templates, t2, "pair template")
    is_first = np.zeros(len(feats), dtype=bool)
    is_first[r1] = True
    order = np.argsort(~is_first, kind="stable")
    position = np.empty(len(order), dtype=np.int32)
    position[order] = np.arange(len(order))
    feats = feats[order]
    a, b = position[r1], position[r2]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    del r1, r2, a, b
    n_tiles = -(-len(feats) // tile)
    tile_of_pair = (lo // tile).astype(np.int64) * n_tiles + hi // tile
    offset = (lo % tile) * tile + hi % tile  # entry of the pair in its tile's [tile, tile] product
    del lo, hi
    # a stable argsort of 8/16-bit keys is a radix sort: one linear pass, unlike a comparison sort
    by_tile = np.argsort(tile_of_pair.astype(np.min_scalar_type(n_tiles * n_tiles - 1)), kind="stable")
    offset = offset[by_tile]
    counts = np.bincount(tile_of_pair, minlength=n_tiles * n_tiles)
    del tile_of_pair
    ends = np.cumsum(counts)
    sorted_scores = np.empty(len(offset), dtype=np.float64)

    def score_tile(k):
        i, j = divmod(int(k), n_tiles)
        product = np.empty((tile, tile))
        rows, cols = feats[i * tile:(i + 1) * tile], feats[j * tile:(j + 1) * tile]
        np.matmul(rows, cols.T, out=product[:len(rows), :len(cols)])
        part = slice(ends[k] - counts[k], ends[k])
        np.take(product, offset[part], out=sorted_scores[part])

    # Tiles are independent: one single-threaded product per tile on each core. This keeps both cores busy
    # without BLAS's per-product thread barriers, which stall whenever another process holds a core.
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(score_tile, np.flatnonzero(counts)))
    scores = np.empty_like(sorted_scores)
    scores[by_tile] = sorted_scores
    return scores


def sort_on_two_cores(values):
    """np.sort(values) on two threads: split at a sampled median, each half sorted in place by one thread
    (np.sort releases the GIL). NaN compares false, so it goes to the upper half, as np.sort puts it last."""
    if (os.cpu_count() or 1) < 2 or len(values) < 2 ** 20:
        return np.sort(values)
    low = values < np.median(values[::len(values) // 4096])
    split = np.count_nonzero(low)
    out = np.empty_like(values)
    out[:split], out[split:] = values[low], values[~low]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(np.ndarray.sort, (out[:split], out[split:])))
    return out


def roc(labels, scores):
    """(fpr, tpr) exactly as sklearn.metrics.roc_curve(labels, scores) returns them (1 = genuine).

    Same points: one per distinct score from the highest down (counts of pairs scoring >= it), collinear
    intermediate points dropped (drop_intermediate=True), (0, 0) prepended. Instead of roc_curve's stable
    argsort carrying the labels along (several times slower at 15.7 M scores) the scores alone are sorted
    and cut into runs of equal scores; only the few runs holding genuine pairs need their labels."""
    scores = np.asarray(scores, dtype=np.float64)
    values = sort_on_two_cores(scores)
    if not (np.isfinite(values[0]) and np.isfinite(values[-1])):  # sorted: -inf first, inf and NaN last
        raise ValueError("pair scores must be finite (a template feature of norm 0 or NaN?)")
    n = len(values)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # runs of equal scores, ascending
    genuine_run = np.sort(np.searchsorted(starts, np.searchsorted(values, scores[np.asarray(labels) == 1])))
    del values
    genuine_in_run = np.bincount(genuine_run, minlength=len(starts))  # zero but in a few runs: stays sparse
    runs = np.unique(genuine_run)
    impostor_in_run = np.diff(np.r_[starts, n])
    impostor_in_run[runs] -= genuine_in_run[runs]
    # roc_curve keeps a point where the next lower distinct score adds a different number of impostor or
    # genuine pairs (a non-zero second difference of the counts); in ascending order: run j-1 vs run j.
    # Genuine counts can only differ next to the runs holding genuine pairs.
    differs = impostor_in_run[1:] != impostor_in_run[:-1]
    near = np.union1d(runs, runs + 1)
    near = near[(near >= 1) & (near < len(starts))]
    differs[near - 1] |= genuine_in_run[near - 1] != genuine_in_run[near]
    keep = np.ones(len(starts), dtype=bool)
    keep[1:-1] = differs[:-1]
    kept = np.flatnonzero(keep)[::-1]  # from the highest score down, like roc_curve
    tps = len(genuine_run) - np.searchsorted(genuine_run, kept)  # genuine pairs in runs >= the kept run
    fps = (n - starts[kept]) - tps
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    if fps[-1] == 0 or tps[-1] == 0:
        raise ValueError("the ROC needs both genuine (label 1) and impostor (label 0) pairs")
    return fps / fps[-1], tps / tps[-1]


def tar_at_far(labels, scores, far_targets=FAR_TARGETS):
    """ROC and TAR at each target FAR: the point with the smallest |FPR - target|, ties -> larger TPR.

    Returns (tar [len(far_targets)] in [0, 1], fpr, tpr) with fpr/tpr equal to sklearn's roc_curve."""
    fpr, tpr = roc(labels, scores)
    # The release reverses the arrays and takes min over (|fpr - x|, index): the first index in the
    # reversed order, i.e. the last original index = the larger TPR among equally close points.
    fpr_rev, tpr_rev = fpr[::-1], tpr[::-1]
    tar = np.array([tpr_rev[np.argmin(np.abs(fpr_rev - x))] for x in far_targets])
    return tar, fpr, tpr


def identification_1n(unique_templates, template_feats, gallery_sets, probe_set, fpir_targets=FPIR_TARGETS,
                      ranks=RANKS):
    """1:N search of the mixed probes against each gallery separately (docs/evaluation.md).

    gallery_sets: list of (template_ids, subject_ids); probe_set: (template_ids, subject_ids).
    Returns {"rank-k": fraction of probe templates whose subject is in the top k (hits summed over the galleries),
             "TPIR@FPIR=x": mean over galleries}."""
    probe_ids, probe_subjects = probe_set
    probe_feats = template_feats[template_rows(unique_templates, probe_ids, "1:N probe template")]
    hits = {k: 0 for k in ranks}
    tpir = {x: [] for x in fpir_targets}
    for gallery_ids, gallery_subjects in gallery_sets:
        gallery_feats = template_feats[template_rows(unique_templates, gallery_ids, "1:N gallery template")]
        sim = probe_feats @ gallery_feats.T
        is_match = probe_subjects[:, None] == gallery_subjects[None, :]
        mated = is_match.any(1)
        mated_score = np.max(sim, axis=1, where=is_match, initial=-np.inf)
        sim[is_match] = -np.inf  # from here on: scores against the other subjects' gallery templates
        best_other = sim.max(1)
        # rank of the mated gallery template = number of non-mated gallery templates scoring higher
        rank = np.count_nonzero(sim > mated_score[:, None], axis=1)[mated]
        for k in ranks:
            hits[k] += int((rank < k).sum())
        nonmated_best = np.sort(best_other[~mated])[::-1]
        mated_score, best_other = mated_score[mated], best_other[mated]
        for x in fpir_targets:
            threshold = nonmated_best[max(int(len(nonmated_best) * x), 1) - 1] if len(nonmated_best) else -np.inf
            tp = (mated_score > best_other) & (mated_score > threshold)
            tpir[x].append(tp.sum() / max(mated.sum(), 1))
    results = {f"rank-{k}": hits[k] / len(probe_ids) for k in ranks}
    results.update({f"TPIR@FPIR={x:g}": float(np.mean(tpir[x])) for x in fpir_targets})
    return results


def plot_roc(curves, path, far_targets=FAR_TARGETS):
    """Save ROC curves [(label, fpr, tpr), ...] to `path` (PNG/PDF by suffix), log-scale FAR, Agg backend."""
    import matplotlib
    matplotlib.use("Agg")  # headless; selected here so importing this module changes no global state
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    left = min(far_targets)
    for label, fpr, tpr in curves:
        # points left of the axis (incl. FPR 0, which a log axis cannot show) are drawn at its left edge
        ax.plot(np.maximum(fpr, left), tpr * 100, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlim(left, 1)
    ax.set_ylim(0, 100)
    ax.set_xticks([x for x in far_targets] + [1])
    ax.grid(True, which="major", linestyle="--", linewidth=0.5)
    ax.set_xlabel("False Accept Rate (log scale)")
    ax.set_ylabel("True Accept Rate (%)")
    ax.set_title("ROC (1:1 verification)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
