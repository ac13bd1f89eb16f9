"""Wall time and peak memory of the IJB-C evaluation after feature extraction, at full IJB-C size.

    python bench/ijbc_post.py [--workdir /tmp/ijbc_post_bench] [--dim 512] [--seed 0]

Generates deterministic synthetic IJB-C-sized meta files (469,375 images, 23,124 templates, 15,658,489 pairs of
which 19,557 genuine, 1:N gallery G1/G2 + mixed probes) once into --workdir (reused when present), and synthetic
float32 image features [N, 2*dim] (embedding | flipped embedding, with an identity signal so the ROC is not
trivial). Then runs each post-extraction stage of eval/ijb.py and prints its wall time, its process CPU time
(less sensitive to other load on a shared machine) and the process' peak
resident memory during the stage (sampled; it includes the 1.8 GiB of image features up to the template
stage, after which eval_ijbc.py drops them too).
"""
import argparse
import os
import resource
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import ijb  # noqa: E402

N_IMAGES, N_TEMPLATES, N_PAIRS, N_GENUINE = 469375, 23124, 15658489, 19557
N_SUBJECTS, N_GALLERY_1 = 3531, 1772  # G1 1,772 + G2 1,759 = 3,531 gallery templates; the rest are probes


def synthetic_layout(seed):
    """Template / media / subject of every image and the pair list, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    # every template gets >= 1 image, the rest spread at random; sorted like the real meta
    templates = np.sort(np.concatenate([np.arange(N_TEMPLATES), rng.integers(0, N_TEMPLATES, N_IMAGES - N_TEMPLATES)]))
    medias = rng.integers(0, 8, N_IMAGES) + 10 * templates  # a few media per template, some with several frames
    subject_of_template = np.concatenate([np.arange(N_SUBJECTS), rng.integers(0, N_SUBJECTS, N_TEMPLATES - N_SUBJECTS)])
    # genuine pairs: a gallery template (one per subject) with another template of the same subject
    by_subject = np.argsort(subject_of_template[N_SUBJECTS:], kind="stable") + N_SUBJECTS
    g1 = rng.choice(by_subject, N_GENUINE)
    g0 = subject_of_template[g1]
    i1 = rng.integers(0, N_TEMPLATES, N_PAIRS - N_GENUINE)
    i2 = rng.integers(0, N_TEMPLATES, N_PAIRS - N_GENUINE)
    i2 = np.where(subject_of_template[i1] == subject_of_template[i2], (i2 + 1) % N_SUBJECTS, i2)
    t1 = np.concatenate([g0, i1])
    t2 = np.concatenate([g1, i2])
    label = (subject_of_template[t1] == subject_of_template[t2]).astype(np.int64)
    return templates + 1, medias, subject_of_template, t1 + 1, t2 + 1, label


def write_meta(root, seed):
    meta = os.path.join(root, "meta")
    os.makedirs(meta, exist_ok=True)
    templates, medias, subject_of_template, t1, t2, label = synthetic_layout(seed)
    rng = np.random.default_rng(seed + 1)
    names = [f"{i}.jpg" for i in range(1, N_IMAGES + 1)]
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, templates.tolist(), medias.tolist()))
    points = rng.uniform(30, 120, (N_IMAGES, 10))
    scores = rng.uniform(0.5, 1.0, N_IMAGES)
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
        f.writelines(f"{n} {' '.join('%.3f' % v for v in p)} {s:.3f}\n" for n, p, s in zip(names, points, scores))
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {c}\n" for a, b, c in zip(t1.tolist(), t2.tolist(), label.tolist()))
    ids = np.arange(1, N_TEMPLATES + 1)
    for name, rows in (("gallery_G1", ids[:N_GALLERY_1]), ("gallery_G2", ids[N_GALLERY_1:N_SUBJECTS]),
                       ("probe_mixed", ids[N_SUBJECTS:])):
        with open(os.path.join(meta, f"ijbc_1N_{name}.csv"), "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.writelines(f"{t},{subject_of_template[t - 1]},img/{t}.jpg\n" for t in rows.tolist())


def synthetic_features(seed, dim, templates, subject_of_template):
    rng = np.random.default_rng(seed + 2)
    centres = rng.standard_normal((N_SUBJECTS, dim), dtype=np.float32)
    subjects = subject_of_template[templates - 1]
    feats = np.empty((len(templates), 2 * dim), dtype=np.float32)
    for start in range(0, len(templates), 65536):  # chunked so generation does not inflate the peak
        rows = slice(start, start + 65536)
        # noise strong enough that the template-level ROC is not all 100 %
        feats[rows] = rng.standard_normal((len(feats[rows]), 2 * dim), dtype=np.float32) * 8.0
        feats[rows, :dim] += centres[subjects[rows]]
        feats[rows, dim:] += centres[subjects[rows]]
    return feats


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/ijbc_post_bench")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.workdir, "meta", "ijbc_1N_probe_mixed.csv")):
        start = time.perf_counter()
        write_meta(args.workdir, args.seed)
        print(f"wrote synthetic meta to {args.workdir} in {time.perf_counter() - start:.1f} s (not timed below)")
    layout = synthetic_layout(args.seed)
    templates, subject_of_template = layout[0], layout[2]
    del layout
    feats = synthetic_features(args.seed, args.dim, templates, subject_of_template)
    del templates
    print(f"features {feats.shape} {feats.dtype} ({feats.nbytes / 1024 ** 3:.2f} GiB); "
          f"RSS before timing {current_rss_gb():.2f} GiB (peak so far {peak_rss_gb():.2f} GiB, from generating)")

    timings, cpu, peaks = [], [], []

    def stage(name, fn):
        start, cpu_start = time.perf_counter(), time.process_time()
        with RssSampler() as rss:
            out = fn()
        timings.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        peaks.append(rss.peak)
        print(f"{name:<32s} {timings[-1]:7.2f} s wall {cpu[-1]:7.2f} s CPU   peak RSS {rss.peak:.2f} GiB", flush=True)
        return out

    meta = stage("read meta (3 files)", lambda: ijb.read_meta(args.workdir, "IJBC"))
    unique, tfeats = stage("image -> template features", lambda: ijb.image_to_template_features(
        feats, meta["faceness"], meta["templates"], meta["medias"]))
    del feats  # as in eval_ijbc.main: image features are not needed after pooling
    scores = stage("pair scores", lambda: ijb.pair_scores(unique, tfeats, meta["t1"], meta["t2"]))
    tar, _, _ = stage("ROC -> TAR@FAR", lambda: ijb.tar_at_far(meta["label"], scores))
    paths = ijb.meta_paths(args.workdir, "IJBC")
    result = stage("1:N (read csv + G1/G2 search)", lambda: ijb.identification_1n(
        unique, tfeats, [ijb.read_1n_csv(p) for p in paths["gallery"]], ijb.read_1n_csv(paths["probe"])))
    print(f"{'total after extraction':<32s} {sum(timings):7.2f} s wall {sum(cpu):7.2f} s CPU   "
          f"peak RSS {max(peaks):.2f} GiB "
          f"(features included until pooled)")
    print("TAR@FAR", dict(zip(ijb.FAR_TARGETS, np.round(tar * 100, 2).tolist())))
    print("1:N", {k: round(v * 100, 2) for k, v in result.items()})


if __name__ == "__main__":
    main()
