"""Generate a deterministic synthetic face dataset in the formats real users have.

    python tools/make_demo_data.py [--out demo_data] [--seed 0] [--num-train-ids 200] [--images-per-id 20]
                                   [--num-test-ids 100] [--bin-pairs 600]

Writes into OUT:
  train/train.rec, train.idx, property   insightface RecordIO layout (docs/data.md), 112x112 aligned
  train/lfw.bin                          verification pairs (.bin) of held-out identities, genuine and impostor
                                         alternating
  ijbc/loose_crop/*.jpg, ijbc/meta/*     IJB-C layout (docs/evaluation.md): loose crops, 5-point landmarks, faceness
                                         scores, templates of several media, all 1:1 template pairs, 1:N files
                                         (defaults: 100 identities x 15 templates, ~6,000 crops, 10,500 genuine
                                         and 1,113,750 impostor pairs, so TAR at FAR 1e-4 rests on 111 impostors)
  manifest.json                          arguments and which generator identity each split uses

Every identity is a parametric face drawn with OpenCV (face and jaw shape, skin tone and texture, eyes, brows, nose,
mouth, hair, beard); every image adds pose, scale and rotation jitter, expression, illumination, colour cast,
background, blur, noise, occlusion and JPEG quality. Landmarks are known by construction: the 5 points (pupils,
nose tip, mouth corners) are computed in the canonical face frame and mapped with the same affine as the pixels.
Train, lfw and IJB-C identities are disjoint (different generator indices).
"""
import argparse
import json
import os
import sys
import time

import cv2
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval.verification import save_bin  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.face_align import estimate_norm  # noqa: E402
from utils.recordio import IndexedRecordWriter, IRHeader, encode_image, pack_header  # noqa: E402

SIZE = 112

# Faces are drawn once per image on a canvas in canonical coordinates (the 112x112 aligned frame), covering
# [CANVAS_LO, CANVAS_LO + CANVAS_SPAN) on both axes at CANVAS_RES pixels per unit, so enlarged loose crops stay sharp.
CANVAS_LO, CANVAS_SPAN, CANVAS_RES = -60.0, 232, 2
CANVAS_PX = CANVAS_SPAN * CANVAS_RES
_SHIFT = 4  # fractional bits for sub-pixel cv2 drawing

HAIR_COLOURS = [(25, 25, 30), (30, 45, 70), (45, 75, 115), (110, 175, 215), (40, 70, 160), (160, 160, 165),
                (215, 215, 220)]  # BGR: black, dark brown, brown, blond, red, grey, white
IRIS_COLOURS = [(35, 60, 100), (30, 38, 48), (170, 120, 70), (90, 130, 80), (130, 130, 120), (50, 100, 130)]
HAIR_STYLES = ("short", "long", "curly", "bald")
ROLE_TRAIN, ROLE_BIN, ROLE_IJBC = 0, 1, 2


# ----------------------------------------------------------------------------------------------------- geometry

def similarity(scale, angle_deg, centre, target):
    """2x3 similarity that rotates/scales about `centre` and moves it to `target`."""
    t = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.concatenate([r, (np.asarray(target) - r @ np.asarray(centre))[:, None]], 1)


def compose(a, b):
    """2x3 affine of 'apply b, then a'."""
    return a[:, :2] @ b + np.concatenate([np.zeros((2, 2)), a[:, 2:]], 1)


def apply(a, pts):
    return pts @ a[:, :2].T + a[:, 2]


def _px(pt):
    """Canonical point -> fixed-point canvas pixel for cv2 drawing with shift=_SHIFT."""
    return tuple(int(round((v - CANVAS_LO) * CANVAS_RES * (1 << _SHIFT))) for v in pt)


def _len(v):
    return int(round(v * CANVAS_RES * (1 << _SHIFT)))


def _thick(v):
    return max(1, int(round(v * CANVAS_RES)))


def _ellipse(img, centre, axes, colour, angle=0.0, thickness=-1, start=0, end=360):
    cv2.ellipse(img, _px(centre), (_len(axes[0]), _len(axes[1])), angle, start, end, colour,
                thickness if thickness < 0 else _thick(thickness), cv2.LINE_AA, _SHIFT)


def _poly(img, pts, colour, thickness=-1):
    p = np.round((np.asarray(pts) - CANVAS_LO) * CANVAS_RES * (1 << _SHIFT)).astype(np.int32)
    if thickness < 0:
        cv2.fillPoly(img, [p], colour, cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(img, [p], False, colour, _thick(thickness), cv2.LINE_AA, _SHIFT)


def _smooth_noise(rng, cells, shape=(CANVAS_PX, CANVAS_PX)):
    """Fixed random field in [-1, 1] with about `cells` (rows, cols) features across the canvas."""
    field = rng.uniform(-1, 1, cells).astype(np.float32)
    return cv2.resize(field, shape[::-1], interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------------------------- identities

def _colour(rgb_like, rng, jitter):
    return np.clip(np.asarray(rgb_like, float) * (1 + rng.normal(0, jitter, 3)), 0, 255)


def sample_identity(rng):
    """Identity parameters in canonical units (BGR colours as float arrays)."""
    eye_y = 51.6 + rng.normal(0, 1.8)
    iod = 35.2 + rng.normal(0, 2.2)
    nose_y = 71.7 + rng.normal(0, 2.0)
    mouth_y = 92.3 + rng.normal(0, 2.0)
    chin = mouth_y + rng.uniform(12, 21)
    top = eye_y - rng.uniform(30, 42)
    skin = (1 - rng.uniform()) * np.array([200, 215, 245.]) + rng.uniform() * np.array([45, 70, 110.])
    skin = _colour(skin, rng, 0.05)
    style = HAIR_STYLES[rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])]
    hair = _colour(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], rng, 0.12)
    return dict(
        eye_y=eye_y, iod=iod, nose_y=nose_y, mouth_y=mouth_y, mouth_w=29.2 + rng.normal(0, 2.5),
        chin=chin, top=top, face_w=iod / 2 + rng.uniform(13, 22), jaw=rng.uniform(0.7, 1.0),
        skin=skin, texture_amp=rng.uniform(0.03, 0.10), texture_cells=int(rng.integers(8, 24)),
        eye_w=rng.uniform(5.0, 7.5), eye_h=rng.uniform(0.38, 0.6), eye_tilt=rng.normal(0, 5),
        iris=_colour(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], rng, 0.1), iris_r=rng.uniform(0.45, 0.6),
        brow_gap=rng.uniform(6.5, 11), brow_arch=rng.uniform(-1, 4), brow_thick=rng.uniform(1.2, 3.2),
        brow_len=rng.uniform(1.2, 1.7), brow_tilt=rng.normal(0, 1.5),
        nose_w=rng.uniform(5.5, 10), nostril=rng.uniform(1.0, 2.0), bridge=rng.uniform(0.78, 0.92),
        lip=np.clip(skin * rng.uniform(0.55, 0.8) + np.array([20, 20, 70.]) * rng.uniform(0.3, 1.0), 0, 255),
        lip_up=rng.uniform(1.5, 4.0), lip_low=rng.uniform(2.0, 5.5), smile=rng.normal(0.5, 1.2),
        ear=(rng.uniform(4.5, 7.5), rng.uniform(8, 13)),
        hair=hair, style=style, hair_vol=rng.uniform(2, 9), hairline=rng.uniform(7, 20),
        hair_tilt=rng.normal(0, 4), hair_curve=rng.uniform(0, 8),
        beard=bool(rng.uniform() < 0.15), moustache=bool(rng.uniform() < 0.15),
        moles=rng.uniform([-1, -1], [1, 1], (int(rng.integers(0, 3)), 2)),
        texture_seed=int(rng.integers(2 ** 31)),
    )


def base_layer(ident):
    """Pose-independent part of an identity: head, ears, neck, hair, beard, skin texture.

    -> (bgr uint8 canvas, alpha uint8 mask of head + shoulders, bool shoulder mask painted per image in clothes).
    """
    rng = np.random.default_rng(ident["texture_seed"])
    n = CANVAS_PX
    coords = np.arange(n, dtype=np.float32) / CANVAS_RES + CANVAS_LO
    gx, gy = coords[None, :], coords[:, None]
    cy, ah = (ident["chin"] + ident["top"]) / 2, (ident["chin"] - ident["top"]) / 2
    aw, skin = ident["face_w"], ident["skin"]

    def mask_of(draw):
        m = np.zeros((n, n), np.uint8)
        draw(m)
        return m > 127

    head = mask_of(lambda m: (_ellipse(m, (56, cy), (aw, ah), 255),
                              _ellipse(m, (56, ident["mouth_y"] - 4), (aw * ident["jaw"], ident["chin"] -
                                                                      ident["mouth_y"] + 4), 255, start=0, end=180)))
    ears = mask_of(lambda m: [_ellipse(m, (56 + s * aw * 0.97, ident["eye_y"] + 9), ident["ear"], 255)
                              for s in (-1, 1)])
    neck = mask_of(lambda m: cv2.rectangle(m, _px((56 - aw * 0.55, cy)), _px((56 + aw * 0.55, 200)), 255, -1,
                                           cv2.LINE_AA, _SHIFT))
    shoulders = mask_of(lambda m: _ellipse(m, (56, ident["chin"] + 32), (aw * 2.5, 34), 255))
    vol = ident["hair_vol"]
    hair_back = np.zeros((n, n), bool)
    if ident["style"] != "bald":
        hair_back = mask_of(lambda m: _ellipse(m, (56, cy - 4), (aw + vol, ah + vol * 0.6), 255)) & (
            gy < ident["eye_y"] + 6)
        if ident["style"] == "long":
            hair_back |= (np.abs(gx - 56) < aw + vol) & (gy >= cy - 4) & (gy < ident["chin"] + 20)
        if ident["style"] == "curly":
            hair_back |= mask_of(lambda m: [
                _ellipse(m, (56 + (aw + vol * 0.5) * np.cos(t), cy - 4 - (ah + vol * 0.4) * np.sin(t)),
                         (vol * 0.9 + 2, vol * 0.9 + 2), 255) for t in np.linspace(0.1, np.pi - 0.1, 9)])
    img = np.zeros((n, n, 3), np.float32)
    img[shoulders] = 128  # repainted per image
    img[hair_back] = ident["hair"]
    skin_mask = neck | ears | head
    img[neck] = skin * 0.85
    img[ears] = skin * 0.95
    img[head] = skin
    tex = ident["texture_amp"] * (_smooth_noise(rng, (ident["texture_cells"],) * 2)
                                  + 0.4 * _smooth_noise(rng, (60, 60)))
    img[skin_mask] *= 1 + tex[skin_mask, None]
    for mx, my in ident["moles"]:
        _ellipse(img, (56 + mx * aw * 0.7, cy + my * ah * 0.5), (0.9, 0.9), tuple(skin * 0.45))
    if ident["beard"]:
        beard = head & (gy > ident["mouth_y"] - 8 + 4 * np.abs(gx - 56) / aw) & (np.abs(gx - 56) < aw * 0.95)
        img[beard] = 0.25 * img[beard] + 0.75 * ident["hair"]
    if ident["style"] != "bald":
        u = (gx - 56) / aw
        hairline = ident["top"] + ident["hairline"] + ident["hair_tilt"] * u - ident["hair_curve"] * u ** 2
        strands = 1 + 0.15 * _smooth_noise(rng, (4, 80))
        fringe = head & (gy < hairline)
        img[fringe] = ident["hair"] * strands[fringe, None]
        img[hair_back & ~head] *= strands[hair_back & ~head, None]
    alpha = (head | ears | neck | hair_back | shoulders).astype(np.uint8) * 255
    return np.clip(img, 0, 255).astype(np.uint8), alpha, shoulders & ~(head | ears | neck | hair_back)


def landmarks(ident, pose):
    """Canonical 5 points of an identity under a pose (yaw, pitch in about [-1, 1]; smile adds to the identity's)."""
    dx_eye, dx_nose, dx_mouth = 5 * pose["yaw"], 9 * pose["yaw"], 6 * pose["yaw"]
    dy_eye, dy_nose, dy_mouth = -1.5 * pose["pitch"], 3 * pose["pitch"], 1.5 * pose["pitch"]
    half_iod, half_mouth = ident["iod"] / 2 * (1 - 0.06 * abs(pose["yaw"])), ident["mouth_w"] / 2
    corner_lift = 0.5 * (ident["smile"] + pose["smile"])
    return np.array([[56 - half_iod + dx_eye, ident["eye_y"] + dy_eye],
                     [56 + half_iod + dx_eye, ident["eye_y"] + dy_eye],
                     [56 + dx_nose, ident["nose_y"] + dy_nose],
                     [56 - half_mouth + dx_mouth, ident["mouth_y"] + dy_mouth - corner_lift],
                     [56 + half_mouth + dx_mouth, ident["mouth_y"] + dy_mouth - corner_lift]])


def draw_features(img, ident, pose, pts):
    """Eyes, brows, nose, mouth (moving with the pose) on a copy of the identity's base canvas."""
    skin, hair = ident["skin"], ident["hair"]
    brow_colour = tuple(hair * 0.8 if ident["style"] != "bald" else skin * 0.4)
    lid = tuple(np.minimum(skin * 0.45, 90) + 35)  # never as dark as the pupil
    for side, (ex, ey) in zip((-1, 1), pts[:2]):
        ew, eh = ident["eye_w"], ident["eye_w"] * ident["eye_h"]
        tilt = side * ident["eye_tilt"]
        bx = np.linspace(-1, 1, 9) * ident["eye_w"] * ident["brow_len"] / 2
        by = ey - eh - ident["brow_gap"] - ident["brow_arch"] * (1 - (bx / bx[-1]) ** 2) + side * bx * 0.1 * \
            ident["brow_tilt"]
        _poly(img, np.stack([ex + side * 1.5 + bx, by + 0.4 * pose["brow"]], 1), brow_colour, ident["brow_thick"])
        if pose["blink"]:
            _ellipse(img, (ex, ey), (ew, 0.8), lid, angle=tilt)
            continue
        _ellipse(img, (ex, ey), (ew, eh), (235, 238, 240), angle=tilt)
        r = min(eh * 1.1, ew * ident["iris_r"])
        _ellipse(img, (ex, ey), (r, r), tuple(ident["iris"]))
        _ellipse(img, (ex, ey), (r * 0.45, r * 0.45), (8, 8, 8))
        _ellipse(img, (ex, ey), (ew, eh), lid, angle=tilt, thickness=0.6, start=180, end=360)
    nx, ny = pts[2]
    bridge = tuple(skin * ident["bridge"])
    for side in (-1, 1):
        _poly(img, [(nx + side * ident["nose_w"] * 0.25 - pose["yaw"] * 3, (pts[0, 1] + ny) / 2 - 4),
                    (nx + side * ident["nose_w"] * 0.45, ny - 1)], bridge, 0.8)
        _ellipse(img, (nx + side * ident["nose_w"] * 0.3, ny + 1.8), (ident["nostril"], ident["nostril"] * 0.6),
                 tuple(skin * 0.35))
    _ellipse(img, (nx, ny), (ident["nose_w"] * 0.5, 2.8), bridge, thickness=0.8, start=10, end=170)
    left, right = pts[3], pts[4]
    centre_y = (left[1] + right[1]) / 2 + 0.5 * (ident["smile"] + pose["smile"])  # corners lifted above centre
    t = np.linspace(-1, 1, 17)
    xs = (left[0] + right[0]) / 2 + t * (right[0] - left[0]) / 2
    line = np.interp(t, [-1, 1], [left[1], right[1]]) + (centre_y - (left[1] + right[1]) / 2) * (1 - t ** 2)
    bow = ident["lip_up"] * (1 - t ** 2) * (1 - 0.35 * np.exp(-(t * 5) ** 2))  # cupid's bow dip at the centre
    lower = line + pose["open"] + ident["lip_low"] * np.sqrt(1 - t ** 2)
    lip = tuple(ident["lip"])
    _poly(img, np.stack([np.r_[xs, xs[::-1]], np.r_[line + pose["open"], lower[::-1]]], 1), lip)
    if pose["open"] > 0.3:
        _poly(img, np.stack([np.r_[xs, xs[::-1]], np.r_[line, line[::-1] + pose["open"]]], 1), (45, 35, 95))
    _poly(img, np.stack([np.r_[xs, xs[::-1]], np.r_[line - bow, line[::-1]]], 1), lip)
    _poly(img, np.stack([xs, line], 1), tuple(ident["lip"] * 0.5), 0.6)
    if ident["moustache"]:
        mx = xs * 1.08 - (xs[0] + xs[-1]) / 2 * 0.08
        _poly(img, np.stack([np.r_[mx, mx[::-1]], np.r_[line - bow - 1, line[::-1] - ident["lip_up"] - 5]], 1),
              tuple(hair))


# ----------------------------------------------------------------------------------------------------- images

def sample_media(rng, loose):
    """Conditions shared by the frames of one media (a photo or a video): scene, light, pose, clothes."""
    return dict(
        # a muted scene: one base colour with smooth variations
        background=np.clip(rng.uniform(30, 225, 3) + rng.normal(0, 35, (3, 3, 3)), 0, 255).astype(np.float32),
        light_dir=rng.uniform(0, 2 * np.pi), light=rng.uniform(0, 0.6), gain=rng.uniform(0.6, 1.25),
        cast=rng.uniform(0.85, 1.15, 3), clothes=rng.uniform(20, 235, 3),
        yaw=float(np.clip(rng.normal(0, 0.45 if loose else 0.35), -1, 1)),
        pitch=float(np.clip(rng.normal(0, 0.35), -1, 1)),
    )


def sample_frame(rng, media):
    pose = dict(yaw=float(np.clip(media["yaw"] + rng.normal(0, 0.08), -1, 1)),
                pitch=float(np.clip(media["pitch"] + rng.normal(0, 0.08), -1, 1)),
                smile=rng.normal(0, 1.0), open=max(0.0, rng.normal(-0.5, 1.5)), brow=rng.normal(0, 1),
                blink=bool(rng.uniform() < 0.04))
    nuisance = dict(blur=rng.uniform(0, 1.6) if rng.uniform() < 0.6 else 0.0, noise=rng.uniform(0, 9),
                    quality=int(rng.integers(35, 96)), occlude=rng.uniform() < 0.25,
                    occ_box=rng.uniform(0, 1, 4), occ_colour=rng.uniform(0, 255, 3),
                    noise_seed=int(rng.integers(2 ** 31)))
    return pose, nuisance


def aligned_affine(rng, pts):
    """Canonical -> 112x112 affine of an aligned training image: the 5-point fit to the template (what a real
    aligner does with detected landmarks) plus small detector jitter."""
    fit = estimate_norm(pts)  # the same 5-point fit to the ArcFace template as utils/face_align.py
    jitter = similarity(1 + rng.normal(0, 0.03), rng.normal(0, 2.0), (56, 60), (56, 60) + rng.normal(0, 1.2, 2))
    return compose(jitter, fit), (SIZE, SIZE)


def loose_affine(rng):
    """Canonical -> loose crop affine: crop larger than 112, face at a random position, scale and rotation."""
    w = int(rng.integers(128, 201))
    h = int(w * rng.uniform(1.0, 1.25))
    frac = rng.uniform(0.5, 0.8)  # part of the crop's short side covered by the 112 canonical box
    slack = (1 - frac) * min(w, h) * 0.3
    target = (w / 2 + rng.uniform(-slack, slack), h / 2 + rng.uniform(-slack, slack))
    return similarity(frac * min(w, h) / SIZE, float(np.clip(rng.normal(0, 10), -25, 25)), (56, 60), target), (w, h)


def render(base, ident, media, pose, nuisance, affine, size):
    """-> (BGR uint8 image, 5 landmarks in its pixels, faceness score)."""
    canvas, alpha, shoulders = base
    canvas = canvas.copy()
    canvas[shoulders] = media["clothes"]
    pts = landmarks(ident, pose)
    draw_features(canvas, ident, pose, pts)
    # canvas pixel u = (x - LO) * RES  =>  x = u / RES + LO
    to_canvas = np.array([[1 / CANVAS_RES, 0, CANVAS_LO], [0, 1 / CANVAS_RES, CANVAS_LO]])
    warp = compose(affine, to_canvas)
    w, h = size
    face = cv2.warpAffine(canvas, warp, size, flags=cv2.INTER_LINEAR).astype(np.float32)
    a = cv2.warpAffine(alpha, warp, size, flags=cv2.INTER_LINEAR).astype(np.float32)[..., None] / 255
    background = cv2.resize(media["background"], size, interpolation=cv2.INTER_CUBIC)
    img = face * a + background * (1 - a)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(media["light_dir"]) * (xx / w - 0.5) + np.sin(media["light_dir"]) * (yy / h - 0.5)) * 2
    img *= (media["gain"] * (1 + media["light"] * ramp))[..., None] * media["cast"]
    lm = apply(affine, pts)
    occluded = 0.0
    if nuisance["occlude"]:
        bw, bh = (0.15 + 0.3 * nuisance["occ_box"][:2]) * (w, h)
        x0, y0 = nuisance["occ_box"][2:] * (w - bw, h - bh)
        x1, y1 = int(x0), int(y0)
        img[y1:int(y0 + bh), x1:int(x0 + bw)] = nuisance["occ_colour"]
        occluded = np.mean((lm[:, 0] >= x1) & (lm[:, 0] < x0 + bw) & (lm[:, 1] >= y1) & (lm[:, 1] < y0 + bh))
    if nuisance["blur"] > 0:
        img = cv2.GaussianBlur(img, (0, 0), nuisance["blur"])
    img += np.random.default_rng(nuisance["noise_seed"]).normal(0, nuisance["noise"], img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    score = np.clip(0.999 - 0.5 * occluded - 0.08 * nuisance["blur"] - 0.004 * nuisance["noise"]
                    - 0.15 * abs(pose["yaw"]), 0.3, 0.999)
    return img, lm, float(score)


class _Identity:
    """Parameters and base canvas of one generator identity (index `index` of split `role`)."""

    def __init__(self, seed, role, index):
        self.key = (role, index)
        self.params = sample_identity(np.random.default_rng([seed, role, index]))
        self.base = base_layer(self.params)

    def image(self, rng, media=None, loose=False):
        """-> (JPEG bytes, landmarks [5,2] in image pixels, faceness score, (w, h))."""
        media = media or sample_media(rng, loose)
        pose, nuisance = sample_frame(rng, media)
        if loose:
            affine, size = loose_affine(rng)
        else:
            affine, size = aligned_affine(rng, landmarks(self.params, pose))
        img, lm, score = render(self.base, self.params, media, pose, nuisance, affine, size)
        return encode_image(img, nuisance["quality"]), lm, score, size


# ----------------------------------------------------------------------------------------------------- writers

def write_train(train_dir, seed, num_ids, per_id, bar):
    """insightface layout: key 0 header [A, B]; keys 1..A-1 images grouped by class; keys A..B-1 class ranges."""
    a, b = 1 + num_ids * per_id, 1 + num_ids * per_id + num_ids
    rng = np.random.default_rng([seed, ROLE_TRAIN, 1 << 30])
    with IndexedRecordWriter(os.path.join(train_dir, "train.rec"), os.path.join(train_dir, "train.idx")) as w:
        w.write_idx(0, pack_header(IRHeader(0, [a, b], 0, 1)))
        key = 1
        for label in range(num_ids):
            ident = _Identity(seed, ROLE_TRAIN, label)
            for _ in range(per_id):
                jpeg = ident.image(rng)[0]
                w.write_idx(key, pack_header(IRHeader(0, float(label), key, 0), jpeg))
                key += 1
                bar.update()
        for label in range(num_ids):
            w.write_idx(a + label, pack_header(IRHeader(0, [1 + label * per_id, 1 + (label + 1) * per_id], 0, 0)))
    with open(os.path.join(train_dir, "property"), "w") as f:
        f.write(f"{num_ids},{SIZE},{SIZE}\n")


def write_bin(path, seed, num_ids, num_pairs, bar):
    """lfw-style pairs of aligned images; genuine (even k) and impostor (odd k) alternate, so every contiguous
    fold of the 10-fold protocol holds both."""
    rng = np.random.default_rng([seed, ROLE_BIN, 1 << 30])
    idents = [_Identity(seed, ROLE_BIN, i) for i in range(num_ids)]
    bins, issame = [], []
    for k in range(num_pairs):
        same = k % 2 == 0
        i, j = (rng.choice(num_ids, 1).repeat(2) if same else rng.choice(num_ids, 2, replace=False))
        bins += [idents[i].image(rng)[0], idents[j].image(rng)[0]]
        issame.append(bool(same))
        bar.update(2)
    save_bin(path, bins, issame)


def ijbc_plan(seed, num_ids, templates_per_id):
    """Template/media/image structure of the IJB-C set: -> (subject ids, [(subject, template id, [[media id,
    n frames], ...]), ...]). Ids are random and non-contiguous like the real release."""
    rng = np.random.default_rng([seed, ROLE_IJBC, 1 << 30])
    num_templates = num_ids * templates_per_id
    subjects = np.sort(rng.choice(np.arange(100, 100 + 20 * num_ids), num_ids, replace=False))
    template_ids = rng.choice(np.arange(1, 1 + 10 * num_templates), num_templates, replace=False)
    n_media = rng.integers(1, 4, num_templates)
    media_ids = iter(rng.choice(np.arange(1, 1 + 50 * int(n_media.sum())), int(n_media.sum()), replace=False))
    plan = []
    for t in range(num_templates):
        media = [[int(next(media_ids)), int(rng.integers(1, 4))] for _ in range(n_media[t])]
        plan.append((t // templates_per_id, int(template_ids[t]), media))
    return subjects, plan


def write_ijbc(root, seed, num_ids, templates_per_id, bar):
    subjects, plan = ijbc_plan(seed, num_ids, templates_per_id)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    rng = np.random.default_rng([seed, ROLE_IJBC, (1 << 30) + 1])
    tid_mid, pts5, rows = [], [], []  # rows: (template id, subject id, file name, media id) per image
    n = 0
    ident = None
    for subject, tid, media in plan:
        if ident is None or ident.key[1] != subject:
            ident = _Identity(seed, ROLE_IJBC, subject)
        for mid, frames in media:
            scene = sample_media(rng, loose=True)
            for _ in range(frames):
                n += 1
                name = f"{n}.jpg"
                jpeg, lm, score, _ = ident.image(rng, scene, loose=True)
                with open(os.path.join(root, "loose_crop", name), "wb") as f:
                    f.write(jpeg)
                tid_mid.append(f"{name} {tid} {mid}\n")
                pts5.append(name + "".join(f" {v:.3f}" for v in lm.ravel()) + f" {score:.3f}\n")
                rows.append((tid, int(subjects[subject]), name, mid))
                bar.update()
    pairs = []  # every template pair: genuine within a subject, impostor across subjects
    for i in range(len(plan)):
        for j in range(i + 1, len(plan)):
            pairs.append(f"{plan[i][1]} {plan[j][1]} {int(plan[i][0] == plan[j][0])}\n")
    gallery_rng = np.random.default_rng([seed, ROLE_IJBC, (1 << 30) + 2])
    g1 = set(gallery_rng.permutation(num_ids)[: num_ids // 2].tolist())
    gallery = {plan[t][1]: (1 if plan[t][0] in g1 else 2) for t in range(0, len(plan), templates_per_id)}
    meta = os.path.join(root, "meta")
    for fname, lines in (("ijbc_face_tid_mid.txt", tid_mid), ("ijbc_name_5pts_score.txt", pts5),
                         ("ijbc_template_pair_label.txt", pairs)):
        with open(os.path.join(meta, fname), "w") as f:
            f.writelines(lines)
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,MEDIA_ID\n"
    for fname, keep in (("ijbc_1N_gallery_G1.csv", lambda t: gallery.get(t) == 1),
                        ("ijbc_1N_gallery_G2.csv", lambda t: gallery.get(t) == 2),
                        ("ijbc_1N_probe_mixed.csv", lambda t: t not in gallery)):
        with open(os.path.join(meta, fname), "w") as f:
            f.write(header)
            f.writelines(f"{t},{s},{name},{m}\n" for t, s, name, m in rows if keep(t))
    num_genuine = sum(p.endswith(" 1\n") for p in pairs)
    return dict(images=n, templates=len(plan), genuine=num_genuine, impostor=len(pairs) - num_genuine,
                subjects={int(subjects[i]): i for i in range(num_ids)})


def generate(out="demo_data", seed=0, num_train_ids=200, images_per_id=20, num_test_ids=100, bin_pairs=600,
             num_bin_ids=None, templates_per_id=15, progress=True):
    """Write the whole demo dataset into `out`; returns the summary that is also saved as manifest.json."""
    if bin_pairs % 2:
        raise ValueError(f"bin_pairs must be even (equal genuine and impostor counts), got {bin_pairs}")
    num_bin_ids = num_bin_ids or num_test_ids
    if num_train_ids < 1 or images_per_id < 1 or num_test_ids < 2 or num_bin_ids < 2 or templates_per_id < 2:
        raise ValueError("need >= 1 train identity and image, >= 2 test/bin identities and >= 2 templates per id")
    start = time.time()
    train_dir, ijbc_dir = os.path.join(out, "train"), os.path.join(out, "ijbc")
    os.makedirs(train_dir, exist_ok=True)
    _, plan = ijbc_plan(seed, num_test_ids, templates_per_id)
    total = num_train_ids * images_per_id + 2 * bin_pairs + sum(f for _, _, m in plan for _, f in m)
    with tqdm(total=total, desc="demo faces", unit="img", disable=not progress) as bar:
        write_train(train_dir, seed, num_train_ids, images_per_id, bar)
        write_bin(os.path.join(train_dir, "lfw.bin"), seed, num_bin_ids, bin_pairs, bar)
        ijbc = write_ijbc(ijbc_dir, seed, num_test_ids, templates_per_id, bar)
    summary = dict(
        seed=seed, num_train_ids=num_train_ids, images_per_id=images_per_id, num_test_ids=num_test_ids,
        bin_pairs=bin_pairs, num_bin_ids=num_bin_ids, templates_per_id=templates_per_id,
        # generator identities are (split, index) pairs, so the three splits never share a face
        identities=dict(train=[ROLE_TRAIN, num_train_ids], lfw=[ROLE_BIN, num_bin_ids], ijbc=[ROLE_IJBC, num_test_ids]),
        ijbc=dict((k, v) for k, v in ijbc.items() if k != "subjects"),
        ijbc_subject_to_identity=ijbc["subjects"],
    )
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    summary["seconds"] = time.time() - start
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_data", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train-ids", type=int, default=200)
    parser.add_argument("--images-per-id", type=int, default=20)
    parser.add_argument("--num-test-ids", type=int, default=100, help="IJB-C identities (and lfw.bin identities)")
    parser.add_argument("--bin-pairs", type=int, default=600, help="lfw.bin pairs, half genuine (even number)")
    args = parser.parse_args()
    s = generate(args.out, args.seed, args.num_train_ids, args.images_per_id, args.num_test_ids, args.bin_pairs)
    ij = s["ijbc"]
    print(f"wrote {args.out}/ in {s['seconds']:.1f} s (seed {s['seed']})\n"
          f"  train/train.rec,.idx,property  {s['num_train_ids']} identities x {s['images_per_id']} images, "
          f"112x112 aligned\n"
          f"  train/lfw.bin                  {s['bin_pairs']} pairs ({s['bin_pairs'] // 2} genuine) of "
          f"{s['num_bin_ids']} held-out identities\n"
          f"  ijbc/loose_crop, ijbc/meta     {ij['images']} crops, {ij['templates']} templates of "
          f"{s['num_test_ids']} identities, {ij['genuine']} genuine + {ij['impostor']} impostor pairs, "
          f"1:N galleries G1/G2 + mixed probes")


if __name__ == "__main__":
    run_main(main)
