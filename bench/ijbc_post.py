"""Wall time and peak memory of the IJB-C evaluation after feature extraction, at full IJB-C size, against a
transcription of the release's eval_ijbc.py stages run in the same process.

    python bench/ijbc_post.py [--workdir /tmp/ijbc_post] [--dim 512] [--seed 0] [--repeats 3] [--release-repeats 1]

Synthetic, deterministic IJB-C-sized data: 469,375 images in 23,124 templates (ids shuffled, so enrollment and
probe ids interleave), 1:N gallery G1/G2 (3,531 enrollment templates, one per subject) and 19,593 mixed probes,
float32 image features [N, 2*dim] (embedding | flipped embedding, with an identity signal so the ROC is not
trivial), and two pair lists of 15,658,489 pairs:

  IJB-C shape   every pair is an enrollment template x a probe template (distinct pairs, grouped by enrollment
                template like the real pair file); this list is the meta file written to --workdir once
  random pairs  both templates drawn uniformly from all templates (plus the 19,557 genuine pairs), in random
                order (in memory)

For each pair list it times the stages eval_ijbc.py runs after extraction (template pooling, pair scores,
ROC -> TAR@FAR, 1:N search; pooling and 1:N do not depend on the pairs and are timed once) and the release's
1:1 stages (per-template pooling loop, pair scores in chunks of 100,000 pairs, sklearn roc_curve and its
nearest-point rule), checks that both give the same TAR at every FAR and scores within 1e-6, and prints the
medians over the repeats. Reading the meta files and writing the outputs (scores, ROC curve and plot) are
timed but not part of the totals. Peak memory is the
process' resident set sampled during our stages; it includes the 1.8 GiB of image features until they are
pooled (then dropped, as eval_ijbc.py does) and ~0.6 GiB of imported libraries.
"""
import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import sklearn.preprocessing
from sklearn.metrics import roc_curve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import ijb  # noqa: E402

N_IMAGES, N_TEMPLATES, N_PAIRS, N_GENUINE = 469375, 23124, 15658489, 19557
N_ENROLLED, N_GALLERY_1 = 3531, 1772  # G1 1,772 + G2 1,759 = 3,531 enrollment templates; the rest are probes
TARGET_SECONDS = {"IJB-C shape": 6.0, "random pairs": 12.0}


# ---------------------------------------------------------------- synthetic data

def synthetic_layout(seed):
    """Template id / media of every image, subject and id of every template (index order: enrolled first)."""
    rng = np.random.default_rng(seed)
    # every template gets >= 1 image, the rest spread at random
    template_index = np.concatenate([np.arange(N_TEMPLATES), rng.integers(0, N_TEMPLATES, N_IMAGES - N_TEMPLATES)])
    template_id = rng.permutation(N_TEMPLATES) + 1  # enrollment and probe ids interleave
    subject = np.concatenate([np.arange(N_ENROLLED), rng.integers(0, N_ENROLLED, N_TEMPLATES - N_ENROLLED)])
    # image meta sorted by template id, like the real file; a few media per template, some with several frames
    template_index = template_index[np.argsort(template_id[template_index], kind="stable")]
    medias = rng.integers(0, 8, N_IMAGES) + 10 * template_index
    return template_index, medias, subject, template_id


def ijbc_shape_pairs(seed, subject):
    """Enrollment x probe template indices: 19,557 genuine (a probe with its subject's enrollment template) and
    distinct random impostor cells of the 3,531 x 19,593 grid, sorted by enrollment template."""
    rng = np.random.default_rng(seed + 3)
    n_probes = N_TEMPLATES - N_ENROLLED
    genuine_probes = rng.choice(n_probes, N_GENUINE, replace=False) + N_ENROLLED
    cells = rng.choice(N_ENROLLED * n_probes, int((N_PAIRS - N_GENUINE) * 1.01), replace=False)
    e, p = cells // n_probes, cells % n_probes + N_ENROLLED
    impostor = subject[e] != subject[p]
    e, p = e[impostor][:N_PAIRS - N_GENUINE], p[impostor][:N_PAIRS - N_GENUINE]
    i1 = np.concatenate([subject[genuine_probes], e])  # enrollment template i is subject i's
    i2 = np.concatenate([genuine_probes, p])
    order = np.lexsort((i2, i1))
    return i1[order], i2[order]


def random_pairs(seed, subject):
    """Template indices drawn uniformly, in random order, plus 19,557 genuine pairs (a probe and its subject's
    enrollment template); a random pair is genuine when the subjects happen to match."""
    rng = np.random.default_rng(seed + 4)
    g2 = rng.integers(N_ENROLLED, N_TEMPLATES, N_GENUINE)
    i1 = np.concatenate([subject[g2], rng.integers(0, N_TEMPLATES, N_PAIRS - N_GENUINE)])
    i2 = np.concatenate([g2, rng.integers(0, N_TEMPLATES, N_PAIRS - N_GENUINE)])
    order = rng.permutation(N_PAIRS)
    return i1[order], i2[order]


def write_meta(root, seed):
    meta = os.path.join(root, "meta")
    os.makedirs(meta, exist_ok=True)
    template_index, medias, subject, template_id = synthetic_layout(seed)
    rng = np.random.default_rng(seed + 1)
    names = [f"{i}.jpg" for i in range(1, N_IMAGES + 1)]
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, template_id[template_index].tolist(), medias.tolist()))
    points = rng.uniform(30, 120, (N_IMAGES, 10))
    scores = rng.uniform(0.5, 1.0, N_IMAGES)
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
        f.writelines(f"{n} {' '.join('%.3f' % v for v in p)} {s:.3f}\n" for n, p, s in zip(names, points, scores))
    i1, i2 = ijbc_shape_pairs(seed, subject)
    label = (subject[i1] == subject[i2]).astype(np.int64)
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {c}\n" for a, b, c in zip(template_id[i1].tolist(), template_id[i2].tolist(),
                                                          label.tolist()))
    index = np.arange(N_TEMPLATES)
    for name, rows in (("gallery_G1", index[:N_GALLERY_1]), ("gallery_G2", index[N_GALLERY_1:N_ENROLLED]),
                       ("probe_mixed", index[N_ENROLLED:])):
        with open(os.path.join(meta, f"ijbc_1N_{name}.csv"), "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.writelines(f"{template_id[i]},{subject[i]},img/{i}.jpg\n" for i in rows.tolist())


def synthetic_features(seed, dim, template_index, subject):
    rng = np.random.default_rng(seed + 2)
    centres = rng.standard_normal((N_ENROLLED, dim), dtype=np.float32)
    subject_of_image = subject[template_index]
    feats = np.empty((len(template_index), 2 * dim), dtype=np.float32)
    for start in range(0, len(feats), 65536):  # chunked so generation does not inflate the peak
        rows = slice(start, start + 65536)
        # noise strong enough that the template-level ROC is not all 100 %
        feats[rows] = rng.standard_normal((len(feats[rows]), 2 * dim), dtype=np.float32) * 8.0
        feats[rows, :dim] += centres[subject_of_image[rows]]
        feats[rows, dim:] += centres[subject_of_image[rows]]
    return feats


# ---------------------------------------------------------------- the release's stages, transcribed

def release_template_features(img_feats, faceness, templates, medias):
    """The release's eval_ijbc.py with its defaults (flip add, norm score, detector score): image2template_feature."""
    half = img_feats.shape[1] // 2
    img_input_feats = (img_feats[:, :half] + img_feats[:, half:]) * faceness[:, np.newaxis]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), half))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_input_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:  # frames of one video are averaged into one feature
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    return sklearn.preprocessing.normalize(template_feats), unique_templates


def release_verification(template_norm_feats, unique_templates, p1, p2):
    """The release's verification(): a template -> row table, pairs in chunks of 100,000."""
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    template2id[unique_templates, 0] = np.arange(len(unique_templates))
    score = np.zeros((len(p1),))
    total_pairs = np.array(range(len(p1)))
    batchsize = 100000
    for s in [total_pairs[i:i + batchsize] for i in range(0, len(p1), batchsize)]:
        feat1 = template_norm_feats[template2id[p1[s]]]
        feat2 = template_norm_feats[template2id[p2[s]]]
        score[s] = np.sum(feat1 * feat2, -1).flatten()
    return score


def release_tar_at_far(label, score):
    """The release's ROC: sklearn roc_curve, arrays reversed, nearest point by min over (|fpr - x|, index)."""
    fpr, tpr, _ = roc_curve(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tar = []
    for x in ijb.FAR_TARGETS:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        tar.append(tpr[min_index])
    return np.array(tar)


# ---------------------------------------------------------------- measuring

def write_outputs(out_dir, scores, fpr, tpr):
    """What eval_ijbc.py writes after the ROC: the scores, the curve and its plot."""
    np.save(os.path.join(out_dir, "ijbc.npy"), scores)
    np.savez(os.path.join(out_dir, "ijbc_roc.npz"), fpr=fpr, tpr=tpr, label="bench-IJBC")
    ijb.plot_roc([("bench-IJBC", fpr, tpr)], os.path.join(out_dir, "ijbc_roc.png"))


def current_rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 ** 3


class RssSampler:
    """Highest resident set size seen while a stage runs (sampled every 5 ms by a thread; ru_maxrss alone
    cannot attribute a peak to a stage because it never goes down)."""

    def __enter__(self):
        self.peak, self.running = current_rss_gb(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, current_rss_gb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, current_rss_gb())


class Timings:
    """Wall and CPU seconds and peak RSS of named stages over repeats; prints one line per run."""

    def __init__(self):
        self.wall, self.cpu, self.peak = {}, {}, {}

    def __call__(self, name, fn):
        start, cpu_start = time.perf_counter(), time.process_time()
        with RssSampler() as rss:
            out = fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)
        self.peak[name] = max(self.peak.get(name, 0.0), rss.peak)
        print(f"  {name:<44s} {wall:7.2f} s wall {cpu:7.2f} s CPU   peak RSS {rss.peak:.2f} GiB", flush=True)
        return out

    def median(self, name, kind="wall"):
        return float(np.median((self.wall if kind == "wall" else self.cpu)[name]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ijbc_post")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of our stages; medians are reported")
    parser.add_argument("--release-repeats", type=int, default=1, help="runs of the release's stages")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.workdir, "meta", "ijbc_1N_probe_mixed.csv")):
        start = time.perf_counter()
        write_meta(args.workdir, args.seed)
        print(f"wrote synthetic meta to {args.workdir} in {time.perf_counter() - start:.1f} s (not timed below)")
    template_index, _, subject, template_id = synthetic_layout(args.seed)
    feats = synthetic_features(args.seed, args.dim, template_index, subject)
    del template_index
    print(f"features {feats.shape} {feats.dtype} ({feats.nbytes / 1024 ** 3:.2f} GiB); RSS {current_rss_gb():.2f} GiB")
    time_stage = Timings()

    meta = time_stage("read meta (3 files, not in totals)", lambda: ijb.read_meta(args.workdir, "IJBC"))
    for _ in range(args.repeats):
        unique, tfeats = time_stage("image -> template features", lambda: ijb.image_to_template_features(
            feats, meta["faceness"], meta["templates"], meta["medias"]))
    for _ in range(args.release_repeats):
        release_tfeats, _ = time_stage("release: image2template_feature", lambda: release_template_features(
            feats, meta["faceness"], meta["templates"], meta["medias"]))
    del feats  # as in eval_ijbc.main: image features are not needed after pooling
    checks = {"template features": np.abs(tfeats - release_tfeats).max()}
    paths = ijb.meta_paths(args.workdir, "IJBC")
    for _ in range(args.repeats):
        time_stage("1:N (read csv + G1/G2 search)", lambda: ijb.identification_1n(
            unique, tfeats, [ijb.read_1n_csv(p) for p in paths["gallery"]], ijb.read_1n_csv(paths["probe"])))

    tars = {}
    for shape in TARGET_SECONDS:
        if shape == "IJB-C shape":
            t1, t2, label = meta.pop("t1"), meta.pop("t2"), meta.pop("label")
        else:
            i1, i2 = random_pairs(args.seed, subject)
            t1, t2, label = template_id[i1], template_id[i2], (subject[i1] == subject[i2]).astype(np.int64)
            del i1, i2
        print(f"{shape}: {len(t1)} pairs, {int(label.sum())} genuine")
        for _ in range(args.repeats):
            scores = time_stage(f"{shape}: pair scores", lambda: ijb.pair_scores(unique, tfeats, t1, t2))
            tar, fpr, tpr = time_stage(f"{shape}: ROC -> TAR@FAR", lambda: ijb.tar_at_far(label, scores))
        if shape == "IJB-C shape":
            with tempfile.TemporaryDirectory() as out:
                time_stage("write outputs (not in totals)", lambda: write_outputs(out, scores, fpr, tpr))
        for _ in range(args.release_repeats):
            release_scores = time_stage(f"{shape}: release verification", lambda: release_verification(
                release_tfeats, unique, t1, t2))
            release_tar = time_stage(f"{shape}: release roc_curve -> TAR@FAR", lambda: release_tar_at_far(
                label, release_scores))
        checks[f"{shape}: scores"] = np.abs(scores - release_scores).max()
        tars[shape] = (tar, release_tar)
        del t1, t2, label, scores, release_scores

    shapes = list(TARGET_SECONDS)
    pooling, search = "image -> template features", "1:N (read csv + G1/G2 search)"
    ours_1to1 = {s: sum(time_stage.median(n) for n in (pooling, f"{s}: pair scores", f"{s}: ROC -> TAR@FAR"))
                 for s in shapes}
    total = {s: ours_1to1[s] + time_stage.median(search) for s in shapes}
    release = {s: sum(time_stage.median(n) for n in ("release: image2template_feature", f"{s}: release verification",
                                                     f"{s}: release roc_curve -> TAR@FAR")) for s in shapes}

    def row(title, values, unit=""):
        print(f"{title:<34s}" + "".join(f"{v:13.2f}{unit}" for v in values))

    print(f"\nmedians over {args.repeats} run(s) of ours, {args.release_repeats} of the release's, wall seconds:")
    print(f"{'':<34s}" + "".join(f"{s:>13s}" for s in shapes))
    row("image -> template features", [time_stage.median(pooling)] * 2)
    row("pair scores", [time_stage.median(f"{s}: pair scores") for s in shapes])
    row("ROC -> TAR@FAR", [time_stage.median(f"{s}: ROC -> TAR@FAR") for s in shapes])
    row("1:N (read csv + search)", [time_stage.median(search)] * 2)
    row("total after extraction", [total[s] for s in shapes])
    row("  target", [TARGET_SECONDS[s] for s in shapes])
    row("ours, 1:1 stages only", [ours_1to1[s] for s in shapes])
    row("release's 1:1 stages", [release[s] for s in shapes])
    row("  release / ours", [release[s] / ours_1to1[s] for s in shapes], "x")
    ours_peak = max(v for k, v in time_stage.peak.items() if "release" not in k and "not in totals" not in k)
    release_peak = max(v for k, v in time_stage.peak.items() if "release" in k)
    print(f"peak RSS: our stages {ours_peak:.2f} GiB, the release's {release_peak:.2f} GiB")
    print(f"not in the totals: read meta {time_stage.median('read meta (3 files, not in totals)'):.2f} s, "
          f"write outputs (scores .npy, ROC .npz and plot) {time_stage.median('write outputs (not in totals)'):.2f} s")
    for shape, (tar, release_tar) in tars.items():
        same = "identical" if np.array_equal(tar, release_tar) else "DIFFERENT"
        print(f"{shape}: TAR@FAR {same} to the release's: "
              f"{dict(zip(ijb.FAR_TARGETS, np.round(tar * 100, 4).tolist()))}")
    for name, value in checks.items():
        print(f"max |ours - release| {name}: {value:.2e} ({'within' if value <= 1e-6 else 'NOT within'} 1e-6)")


if __name__ == "__main__":
    main()
