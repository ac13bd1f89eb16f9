"""See DPAP and EHSM on faces: one PNG grid per batch, one row per face.

    python tools/visualize_method.py demo_data/train --model work_dirs/demo/model.pt --config configs/demo.py
    python tools/visualize_method.py photo.jpg --landmarks "203,102,246,103,223,127,204,141,243,141" \
        --model glint360k_model_TransFace_L.pt --config configs/glint360k_vit_l.py -o vis/

Faces: a RecordIO folder (train.rec/train.idx) or train.rec, a folder of images (searched recursively), a
verification .bin, or image files. Without --landmarks an image must be an aligned 112x112 face; with them it is
aligned by utils/face_align.py (one 'x1,y1,...,x5,y5' or '-' per image file, as tools/inference.py).

Columns: the aligned face; the SE gate's patch weights (softmax over the img_size/patch_size grid, shown x N so 1
is uniform); the top-k DPAP patches (dpap_plan, numbered by rank); the face after dpap() with a fixed seed; the
per-token std that EHSM turns into the sample weight printed on the row (losses.ehsm_weights with the config's
gamma/top_k/measure/reduction). The model runs in eval mode on the clean faces (training computes the weights in
train mode, where masking and drop-path add noise). --dpap-prob defaults to 1 so every row shows a perturbation
(training uses the config's dpap_prob, 0.2 in the released configs); partners come from the whole batch, as in
training. --sort ehsm puts the rows EHSM weighs most (the hardest samples) first within each grid.
"""
import argparse
import glob
import json
import os
import sys
import warnings

import cv2
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbones import get_model  # noqa: E402
from backbones.vit import VisionTransformer  # noqa: E402
from dataset import IMAGE_EXTENSIONS, to_tensor  # noqa: E402
from dpap import dpap, dpap_plan  # noqa: E402
from eval.verification import read_bin  # noqa: E402
from losses import ehsm_weights  # noqa: E402
from tools.inference import parse_landmarks  # noqa: E402
from utils.face_align import norm_crop  # noqa: E402
from utils.model_loading import load_backbone  # noqa: E402
from utils.recordio import IndexedRecordReader, decode_image, insightface_layout  # noqa: E402
from utils.utils_config import get_config  # noqa: E402
from utils.cli import run_main  # noqa: E402

IMAGE_SIZE = 112


# ---------------------------------------------------------------------------------------------------- faces
def read_image(path, landmarks=None):
    """RGB uint8 [112,112,3]: aligned with 5 (or 68) landmarks, or an already aligned crop."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    if landmarks is not None:
        bgr = norm_crop(bgr, landmarks, IMAGE_SIZE)
    elif bgr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path} is {bgr.shape[1]}x{bgr.shape[0]}: pass --landmarks, or give an aligned "
                         f"{IMAGE_SIZE}x{IMAGE_SIZE} face")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rec(rec_path, limit):
    """The first `limit` images of an insightface .rec (index: the .idx next to it)."""
    reader = IndexedRecordReader(rec_path, os.path.splitext(rec_path)[0] + ".idx")
    keys, _ = insightface_layout(reader)
    faces = []
    for key in list(keys)[:limit]:
        where = f"{reader.rec_path}: record key {key}"
        _, payload = reader.read_header(int(key))
        faces.append((f"rec key {key}", decode_image(payload, where)))
    reader.close()
    return faces


def read_bin_faces(path, limit):
    bins, _ = read_bin(path)
    faces = []
    for i, buf in enumerate(bins[:limit]):
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{path}: image {i} cannot be decoded")
        if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            img = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE))  # as eval/verification.load_bin
        faces.append((f"{os.path.basename(path)} #{i}", cv2.cvtColor(img, cv2.COLOR_BGR2RGB)))
    return faces


def load_faces(inputs, landmarks=None, limit=16):
    """-> list of (name, RGB uint8 [112,112,3]) from the inputs in order, at most `limit`.
    `landmarks`: one entry (points or None) per input that is an image file."""
    landmarks = list(landmarks or [])
    faces = []
    for path in inputs:
        left = limit - len(faces)
        if left <= 0:
            break
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.rec")):
            faces += read_rec(os.path.join(path, "train.rec"), left)
        elif path.endswith(".rec"):
            faces += read_rec(path, left)
        elif path.endswith(".bin"):
            faces += read_bin_faces(path, left)
        elif os.path.isdir(path):
            files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"{path}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
            faces += [(os.path.relpath(f, path), read_image(f)) for f in files[:left]]
        elif os.path.isfile(path):
            faces.append((os.path.basename(path), read_image(path, landmarks.pop(0) if landmarks else None)))
        else:
            raise FileNotFoundError(f"{path}: not a file or folder")
    return faces


# ---------------------------------------------------------------------------------------------------- model
def build_model(network, network_kwargs, path=None):
    """The ViT from `path` (state_dict, released file or training checkpoint; weights_only loading), or randomly
    initialised with a warning when path is None."""
    if path is None:
        warnings.warn("no --model given: the network is randomly initialised, the maps show no learned structure")
        model = get_model(network, **network_kwargs).eval()
    else:
        model = load_backbone(path, network, network_kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"--network {network} is not a ViT: DPAP and EHSM use the ViT's patch weights and tokens")
    return model


# ---------------------------------------------------------------------------------------------------- method
def analyse(model, faces, top_k=7, prob=1.0, alpha=1.0, seed=0, ehsm=None):
    """Everything one grid shows, for a batch of RGB uint8 faces [B,112,112,3] (numpy).

    -> dict of numpy arrays: faces (the input), patch_weights [B,gh,gw] (the SE gate's softmax), entropy
    [B,gh,gw] (per-token std), top_k [B,K] (dpap_plan's cells, by rank), gate [B], perturbed (float32 [B,3,H,W],
    dpap()'s output) and perturbed_u8 [B,H,W,3], ehsm [B]; grid (gh, gw) and patch_size. dpap_plan and dpap()
    each get a generator seeded with `seed`, so the outlined cells are the ones dpap() perturbs. `ehsm`: keyword
    arguments of losses.ehsm_weights (gamma, top_k, measure, reduction).
    """
    device = next(model.parameters()).device
    images = torch.stack([to_tensor(face, False) for face in faces]).to(device)
    gh = gw = model.img_size // model.patch_size
    with torch.no_grad():
        _, patch_weights, patch_entropy = model(images, return_aux=True)
        patch_weights, patch_entropy = patch_weights.float(), patch_entropy.float()
        plan = dpap_plan(patch_weights, top_k, prob, alpha, torch.Generator(device).manual_seed(seed))
        perturbed = dpap(images, patch_weights, top_k, prob, model.patch_size, alpha,
                         torch.Generator(device).manual_seed(seed))
        weights = ehsm_weights(patch_entropy, **(ehsm or {}))
    perturbed_u8 = (perturbed * 0.5 + 0.5).mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    return dict(faces=np.asarray(faces), patch_weights=patch_weights.reshape(-1, gh, gw).cpu().numpy(),
                entropy=patch_entropy.reshape(-1, gh, gw).cpu().numpy(), top_k=plan.patches.cpu().numpy(),
                gate=plan.gate.cpu().numpy(), perturbed=perturbed.cpu().numpy(),
                perturbed_u8=perturbed_u8.cpu().numpy(), ehsm=weights.cpu().numpy(), grid=(gh, gw),
                patch_size=model.patch_size)


def sort_rows(rows, names, by):
    """Reorder the per-face arrays of `rows` (and names): by 'ehsm' = largest EHSM weight first, 'none' = as read."""
    if by == "none":
        return rows, names
    order = np.argsort(-rows["ehsm"], kind="stable")
    sorted_rows = {k: (v[order] if isinstance(v, np.ndarray) and v.shape[:1] == order.shape else v)
                   for k, v in rows.items()}
    return sorted_rows, [names[i] for i in order]


def row_label(name, weight):
    """The text printed left of a row (the EHSM weight to 4 decimals)."""
    return f"{name}\nEHSM w = {weight:.4f}"


# ---------------------------------------------------------------------------------------------------- drawing
def draw(rows, names, path=None, seed=0, prob=1.0):
    """One figure, one row per face: face | patch weights | top-k patches | DPAP | token std. -> the figure."""
    gh, gw = rows["grid"]
    p = rows["patch_size"]
    n = len(names)
    extent = (-0.5, gw * p - 0.5, gh * p - 0.5, -0.5)  # the grid covers the top-left gw*p x gh*p pixels
    titles = ["aligned face", f"patch weight x {gh * gw}\n(SE gate; 1 = uniform)",
              f"top-{rows['top_k'].shape[1]} DPAP patches", f"after dpap()\nseed {seed}, prob {prob:g}",
              "token std (EHSM input)"]
    fig, axes = plt.subplots(n, 5, figsize=(13.5, 2.6 * n + 0.6), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1, 1.25, 1, 1, 1.25]))
    for i in range(n):
        face = rows["faces"][i]
        ax = axes[i]
        ax[0].imshow(face)
        ax[0].set_ylabel(row_label(names[i], rows["ehsm"][i]), fontsize=10, rotation=0, ha="right", va="center",
                         labelpad=8)
        for col, values in ((1, rows["patch_weights"][i] * gh * gw), (4, rows["entropy"][i])):
            ax[col].imshow(face, alpha=0.45)
            heat = ax[col].imshow(values, cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
            ax[col].set_xlim(-0.5, face.shape[1] - 0.5)  # the whole face, also the strip the grid leaves out
            ax[col].set_ylim(face.shape[0] - 0.5, -0.5)
            bar = fig.colorbar(heat, ax=ax[col], fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=8)
        ax[2].imshow(face)
        for rank, cell in enumerate(rows["top_k"][i]):
            r, c = divmod(int(cell), gw)
            ax[2].add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, edgecolor="#00e5ff",
                                      linewidth=1.5))
            ax[2].text(c * p + p / 2 - 0.5, r * p + p / 2 - 0.5, str(rank + 1), color="#00e5ff", fontsize=8,
                       ha="center", va="center", fontweight="bold")
        ax[3].imshow(rows["perturbed_u8"][i])
        if not rows["gate"][i]:
            ax[3].text(face.shape[1] / 2, face.shape[0] - 8, "gate closed:\nunchanged", color="white", fontsize=8,
                       ha="center", va="bottom", bbox=dict(facecolor="black", alpha=0.6, linewidth=0))
        for col in range(5):
            ax[col].set_xticks([])
            ax[col].set_yticks([])
            if i == 0:
                ax[col].set_title(titles[col], fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="RecordIO folder or train.rec, image folder, .bin, image files")
    parser.add_argument("--landmarks", nargs="*", default=None,
                        help="one per image file: 'x1,y1,...,x5,y5', a file of 5 'x y' rows, or - (already aligned)")
    parser.add_argument("--model", default=None, help="backbone .pt (state_dict or checkpoint_gpu_*.pt); "
                        "omitted: random init (with a warning)")
    parser.add_argument("--config", default="configs/ms1mv2_vit_s.py",
                        help="network, network_kwargs, embedding_size, dpap_* and ehsm_* come from here")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--network", default=None, help="override the config's network")
    parser.add_argument("--network-kwargs", type=json.loads, default=None, help="override network_kwargs (JSON)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DPAP draws")
    parser.add_argument("--dpap-prob", type=float, default=1.0, help="DPAP gate probability for the picture")
    parser.add_argument("--sort", default="none", choices=["none", "ehsm"], help="ehsm: hardest samples first")
    parser.add_argument("--batch-size", type=int, default=8, help="faces per DPAP batch and per grid")
    parser.add_argument("--limit", type=int, default=16, help="at most this many faces")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-o", "--output", default="work_dirs/visualize", help="output folder for grid_NNN.png")
    args = parser.parse_args(argv)
    try:
        cfg = get_config(args.config, args.opts)
        network = args.network or cfg.network
        kwargs = {"num_features": cfg.embedding_size, **(cfg.network_kwargs if args.network_kwargs is None
                                                          else args.network_kwargs)}
        landmarks = [parse_landmarks(t) for t in args.landmarks] if args.landmarks else None
        faces = load_faces(args.inputs, landmarks, args.limit)
        model = build_model(network, kwargs, args.model).to(args.device)
    except (ValueError, FileNotFoundError, KeyError) as error:
        sys.exit(f"error: {error}")
    ehsm = dict(gamma=cfg.ehsm_gamma, top_k=cfg.ehsm_top_k, measure=cfg.ehsm_measure, reduction=cfg.ehsm_reduction)
    os.makedirs(args.output, exist_ok=True)
    for page, start in enumerate(range(0, len(faces), args.batch_size)):
        names, batch = zip(*faces[start:start + args.batch_size])
        rows = analyse(model, np.stack(batch), cfg.dpap_top_k, args.dpap_prob, cfg.dpap_alpha, args.seed, ehsm)
        rows, names = sort_rows(rows, list(names), args.sort)
        path = os.path.join(args.output, f"grid_{page:03d}.png")
        plt.close(draw(rows, names, path, args.seed, args.dpap_prob))
        print(f"wrote {path}: " + ", ".join(f"{n} (EHSM {w:.4f})" for n, w in zip(names, rows["ehsm"])))


if __name__ == "__main__":
    run_main(main)
