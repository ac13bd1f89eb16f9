"""A tiny IJB-C-layout folder (docs/evaluation.md) for the evaluation tests.

make_ijb_fixture(root) writes root/loose_crop/*.jpg and root/meta/*: a few identities, each with several
templates made of several media (some media with more than one frame, a media id reused by two templates),
non-contiguous template/media ids, every template pair as a genuine or impostor pair, and 1:N gallery/probe
csv files. Each image is a random texture warped so that the ArcFace reference points land on known
landmark positions (the landmarks written to the meta file).
"""
import itertools
import os

import cv2
import numpy as np

from utils.face_align import ARCFACE_REFERENCE

GALLERY_NAMES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


def random_similarity(rng, size):
    """2x3 similarity matrix placing the 112x112 reference frame somewhere inside a size x size crop."""
    scale = rng.uniform(1.0, 1.3)
    angle = rng.uniform(-0.2, 0.2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = (size - 112 * scale) / 2 + rng.uniform(-5, 5, 2)
    return np.hstack([rot, shift[:, None]])


def make_ijb_fixture(root, target="IJBC", num_ids=4, templates_per_id=3, size=144, seed=0):
    rng = np.random.default_rng(seed)
    prefix = target.lower()
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    faces = rng.integers(0, 256, (num_ids, 112, 112, 3), dtype=np.uint8)  # one texture per identity (BGR)
    tid_mid, lmk_score, template_ids, subjects = [], [], [], []
    image_number = 1
    for identity in range(num_ids):
        for k in range(templates_per_id):
            template = 100 + 7 * (identity * templates_per_id + k)
            template_ids.append(template)
            subjects.append(1000 + identity)
            for m in range(2 + (k % 2)):
                # media ids are per identity, so media 0 of an identity appears in several templates
                media = 5000 + 10 * identity + m
                for _ in range(1 + (m == 1)):
                    matrix = random_similarity(rng, size)
                    noise = rng.integers(-20, 21, faces[identity].shape)
                    face = np.clip(faces[identity].astype(np.int64) + noise, 0, 255).astype(np.uint8)
                    img = cv2.warpAffine(face, matrix, (size, size), borderValue=0)
                    points = ARCFACE_REFERENCE @ matrix[:, :2].T + matrix[:, 2]
                    name = f"{image_number}.jpg"
                    cv2.imwrite(os.path.join(root, "loose_crop", name), img)
                    tid_mid.append(f"{name} {template} {media}")
                    score = rng.uniform(0.6, 1.0)
                    lmk_score.append(name + " " + " ".join(f"{v:.3f}" for v in points.reshape(-1)) + f" {score:.3f}")
                    image_number += 1
    pairs = [f"{a} {b} {int(subjects[i] == subjects[j])}"
             for (i, a), (j, b) in itertools.combinations(enumerate(template_ids), 2)]
    meta = os.path.join(root, "meta", prefix)
    for suffix, lines in (("face_tid_mid", tid_mid), ("name_5pts_score", lmk_score), ("template_pair_label", pairs)):
        with open(f"{meta}_{suffix}.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    # 1:N: the first template of each identity is enrolled, identities split over the two galleries;
    # all other templates are the mixed probes. One csv row per image, as in the real files.
    rows_of = {t: [line.split()[0] for line in tid_mid if int(line.split()[1]) == t] for t in template_ids}
    first = template_ids[::templates_per_id]
    half = num_ids // 2
    sets = {f"gallery_{GALLERY_NAMES[target][0]}": first[:half], f"gallery_{GALLERY_NAMES[target][1]}": first[half:],
            "probe_mixed": [t for t in template_ids if t not in first]}
    for name, chosen in sets.items():
        with open(f"{meta}_1N_{name}.csv", "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            for t in chosen:
                for image in rows_of[t]:
                    f.write(f"{t},{subjects[template_ids.index(t)]},img/{image}\n")
    return dict(num_images=image_number - 1, template_ids=template_ids, subjects=subjects, num_pairs=len(pairs))
