"""Embed face images with a trained backbone (.pt) or an exported model (.onnx).

    python tools/inference.py a.jpg b.jpg --model work_dirs/ms1mv2_vit_s/model.pt --network vit_s_dp005_mask_0 \
        --landmarks "38,52,74,51,56,72,42,92,71,92" "40,50,75,52,57,70,41,93,72,91"

Without landmarks (no --landmarks, or "-" for that image) an image must already be an aligned 112x112 face.
With two images the cosine similarity of their embeddings is printed; --save writes all embeddings as one .npy
array [num_images, F]. Alignment and preprocessing are those of eval_ijbc.py (utils/face_align.norm_crop).
"""
import argparse
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import UserError, json_object, run_main  # noqa: E402
from utils.face_align import norm_crop  # noqa: E402
from utils.model_loading import load_backbone, open_onnx  # noqa: E402


def parse_landmarks(text):
    """Landmarks as 'x1,y1,...,x5,y5' (10 numbers) or a path to a text file of 5 (or 68) 'x y' rows;
    "-" means the image is already aligned (None)."""
    if text == "-":
        return None
    if os.path.isfile(text):
        try:
            points = np.loadtxt(text, dtype=np.float32, ndmin=2)
        except ValueError as error:  # also UnicodeDecodeError: not a text file
            raise UserError(f"{text}: expected a landmark file of 5 (or 68) 'x y' rows of numbers "
                            f"({' '.join(str(error).split())[:120]})") from None
        points = points.reshape(-1, 2) if points.size % 2 == 0 else points
    else:
        try:
            points = np.array([float(v) for v in text.replace(" ", ",").split(",") if v], dtype=np.float32)
        except ValueError:
            raise UserError(f"--landmarks '{text}' is neither a file nor 10 comma-separated numbers") from None
        points = points.reshape(-1, 2) if points.size % 2 == 0 else points
    if points.ndim != 2 or points.shape[0] not in (5, 68):
        raise UserError(f"--landmarks '{text}': expected 5 (or 68) x,y points, got {points.size} numbers")
    return points


def load_face(path, landmarks=None, image_size=112):
    """Read `path` (BGR), align it when landmarks are given, return RGB float32 CHW in [-1, 1]."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: cannot read image (missing, or not an image file OpenCV can decode)")
    if landmarks is not None:
        image = norm_crop(image, landmarks, image_size=image_size)
    elif image.shape[:2] != (image_size, image_size):
        raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]}: pass --landmarks, "
                        f"or give an aligned {image_size}x{image_size} face")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def embed(batch, model_path, network=None, network_kwargs=None, device="cpu"):
    """Embeddings [N, F] (float32 numpy) of a normalised batch [N, 3, H, W]."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model not found: {model_path}")
    if model_path.endswith(".onnx"):
        session = open_onnx(model_path, torch.device(device).type)
        name = session.get_inputs()[0].name
        return session.run(None, {name: batch})[0]
    if network is None:
        raise UserError("a .pt model needs --network (the backbone name it was trained with)")
    model = load_backbone(model_path, network, network_kwargs).to(device)
    with torch.inference_mode():
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", required=True, help="backbone state_dict (.pt) or exported model (.onnx)")
    parser.add_argument("--network", help="backbone name (needed for .pt)")
    parser.add_argument("--network-kwargs", type=json_object, default={}, help="JSON of extra get_model kwargs")
    parser.add_argument("--landmarks", nargs="*", default=None,
                        help="one per image: 'x1,y1,...,x5,y5', a file of 5 'x y' rows, or - (already aligned)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save", help="write the embeddings to this .npy file")
    args = parser.parse_args()

    if args.landmarks is not None and len(args.landmarks) != len(args.images):
        parser.error(f"{len(args.images)} images but {len(args.landmarks)} --landmarks")
    landmarks = [parse_landmarks(text) for text in args.landmarks] if args.landmarks else [None] * len(args.images)
    batch = np.stack([load_face(path, points) for path, points in zip(args.images, landmarks)])
    embeddings = embed(batch, args.model, args.network, args.network_kwargs, args.device)
    for path, vector in zip(args.images, embeddings):
        print(f"{path}: norm {np.linalg.norm(vector):.4f}, first values {np.array2string(vector[:4], precision=4)}")
    if len(args.images) == 2:
        a, b = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        print(f"cosine similarity: {float(a @ b):.6f}")
    if args.save:
        np.save(args.save, embeddings)
        print(f"saved {embeddings.shape} embeddings to {args.save}")


if __name__ == "__main__":
    run_main(main)
