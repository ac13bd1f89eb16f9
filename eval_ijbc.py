"""IJB-C / IJB-B 1:1 verification (TAR@FAR) and, when the 1:N files are present, 1:N identification.

    python eval_ijbc.py --model-prefix work_dirs/glint360k_vit_l/model.pt \
        --result-dir work_dirs/glint360k_vit_l --network vit_l_dp005_mask_005

The IJB root comes from IJB_ROOT below (edit it once, as with the release's eval_ijbc.py) or --image-path.
Stages live in eval/ijb.py (protocol in docs/evaluation.md). Outputs go to <result-dir>/<job>/ (see main).
"""
import argparse
import csv
import json
import os

import numpy as np
import torch

from backbones import is_vit
from eval import ijb
from utils.amp import AMP_DTYPES
from utils.cli import UserError, run_main
from utils.npio import ArrayFileError, load_array

# >>> Path of the IJB-C (or IJB-B) dataset: the folder holding loose_crop/ and meta/. Edit it here, or pass
# >>> --image-path, which overrides it.
IJB_ROOT = "/mnt/workspace/ijb/IJBC"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="IJB-B / IJB-C evaluation (1:1 TAR@FAR, 1:N TPIR/rank)")
    parser.add_argument("--model-prefix", default="work_dirs/ms1mv2_vit_s/model.pt",
                        help="backbone weights (.pt state_dict; .onnx with --onnx)")
    parser.add_argument("--image-path", default=None,
                        help=f"IJB root holding loose_crop/ and meta/ (default: IJB_ROOT in eval_ijbc.py, {IJB_ROOT})")
    parser.add_argument("--result-dir", default=".")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (each also flipped)")
    parser.add_argument("--network", default="vit_s_dp005_mask_0", help="backbones.get_model name")
    parser.add_argument("--network-kwargs", type=json.loads, default={},
                        help='JSON of extra get_model kwargs, e.g. \'{"embed_dim": 32, "depth": 1}\'')
    parser.add_argument("--job", default="insightface", help="sub-folder of --result-dir and table row name")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (read + align)")
    parser.add_argument("--amp", default=None, choices=list(AMP_DTYPES),
                        help="autocast dtype for extraction; default: fp16 for a ViT on CUDA (the release's "
                             "numerics), else none (float32)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone before extraction")
    # Scoring switches; defaults as the released script (flip add, norm score, detector score all on)
    parser.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=True,
                        help="combine each image with its horizontal flip")
    parser.add_argument("--flip-mode", default="add", choices=["add", "concat"])
    parser.add_argument("--norm-score", action=argparse.BooleanOptionalAction, default=True,
                        help="keep raw image-feature norms as a quality weight (off: L2-normalise each image)")
    parser.add_argument("--detector-score", action=argparse.BooleanOptionalAction, default=True,
                        help="weight image features by the faceness score")
    parser.add_argument("--save-features", default=None, help="save extracted image features [N, 2F] (.npy)")
    parser.add_argument("--features", default=None, help="reuse image features saved by --save-features")
    parser.add_argument("--onnx", action="store_true", help="--model-prefix is an exported .onnx (onnxruntime)")
    args = parser.parse_args(argv)
    if not isinstance(args.network_kwargs, dict):
        parser.error("--network-kwargs must be a JSON object")
    if args.image_path is None:
        args.image_path = IJB_ROOT
    if not os.path.isdir(args.image_path):
        raise UserError(f"IJB dataset not found at {args.image_path}: set IJB_ROOT at the top of eval_ijbc.py "
                        f"or pass --image-path <folder holding loose_crop/ and meta/>")
    return args


def default_amp(network, device, onnx=False):
    """The release runs every ViT block under forced CUDA fp16 autocast, with the attention core, patch
    embedding and head in float32; our ViT does exactly that under an outer fp16 autocast (backbones/vit.py).
    Off CUDA the release's forced autocast is inactive, so float32; CNNs evaluate in float32 as in arcface_torch."""
    return "fp16" if device.type == "cuda" and is_vit(network) and not onnx else "none"


class OnnxBackbone:
    """Callable like a backbone: float32 [B,3,S,S] tensor -> embedding tensor, via onnxruntime."""

    def __init__(self, path, device):
        from utils.model_loading import open_onnx

        self.session = open_onnx(path, device.type)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        out = self.session.run(None, {self.input_name: x.float().cpu().numpy()})[0]
        return torch.from_numpy(out)


def load_model(args, device):
    if args.onnx:
        return OnnxBackbone(args.model_prefix, device)
    from utils.model_loading import load_backbone  # strict load, weights_only=True, clear key-mismatch error
    model = load_backbone(args.model_prefix, args.network, args.network_kwargs, map_location="cpu").to(device)
    if args.compile:
        model.compile()
    return model


def extract_features(args, meta, device):
    dataset = ijb.IJBImages(os.path.join(args.image_path, "loose_crop"), meta["names"], meta["landmarks"],
                            args.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    model = load_model(args, device)
    amp = args.amp or default_amp(args.network, device, args.onnx)
    print(f"feature extraction on {device}, autocast: {amp}")
    return ijb.embed(model, loader, device, AMP_DTYPES[amp])


def load_features(path, num_images):
    expect = (f"features [{num_images}, 2F] (float; one row per meta line, embedding | flipped embedding, as "
              "written by --save-features)")
    feats = load_array(path, expect, kinds="f", shape=(num_images, None), mmap=True)
    if feats.shape[1] % 2:
        raise ArrayFileError(f"{path}: expected {expect}, got an odd width {feats.shape[1]}")
    return feats


def tar_row_name(target):
    """The release names the TAR row "<score file stem>-<target>" (ijbc-IJBC), whatever --job is; the 1:N row
    takes the same name so both tables of one run agree."""
    return f"{target.lower()}-{target}"


def tar_table(target, tar):
    from prettytable import PrettyTable

    table = PrettyTable(["Methods"] + [f"{x:g}" for x in ijb.FAR_TARGETS])
    table.add_row([tar_row_name(target)] + [f"{v * 100:.2f}" for v in tar])
    return table


def write_table(path_stem, header, row_name, values, decimals=2):
    """Markdown (rounded like the paper) and CSV (full precision) of one result row."""
    with open(path_stem + ".md", "w") as f:
        f.write("| " + " | ".join(["Methods"] + header) + " |\n")
        f.write("|" + "---|" * (len(header) + 1) + "\n")
        f.write("| " + " | ".join([row_name] + [f"{v:.{decimals}f}" for v in values]) + " |\n")
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Methods"] + header)
        writer.writerow([row_name] + [repr(float(v)) for v in values])


def run_1n(args, unique_templates, template_feats, out_dir, name):
    paths = ijb.meta_paths(args.image_path, args.target)
    needed = paths["gallery"] + [paths["probe"]]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        print(f"1:N identification skipped: {', '.join(missing)} not found")
        return None
    results = ijb.identification_1n(unique_templates, template_feats, [ijb.read_1n_csv(p) for p in paths["gallery"]],
                                    ijb.read_1n_csv(paths["probe"]))
    from prettytable import PrettyTable

    table = PrettyTable(["Methods"] + list(results))
    table.add_row([tar_row_name(args.target)] + [f"{v * 100:.2f}" for v in results.values()])
    print(f"1:N identification (%), galleries {'/'.join(ijb.GALLERIES[args.target])}:")
    print(table)
    write_table(os.path.join(out_dir, f"{name}_1n"), list(results), tar_row_name(args.target),
                [v * 100 for v in results.values()])
    return results


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.target.lower()
    out_dir = os.path.join(args.result_dir, args.job)
    os.makedirs(out_dir, exist_ok=True)

    meta = ijb.read_meta(args.image_path, args.target)
    print(f"{args.target}: {len(meta['names'])} images, {len(np.unique(meta['templates']))} templates, "
          f"{len(meta['label'])} pairs ({int(meta['label'].sum())} genuine)")
    if args.features:
        img_feats = load_features(args.features, len(meta["names"]))
    else:
        img_feats = extract_features(args, meta, device)
        if args.save_features:
            os.makedirs(os.path.dirname(os.path.abspath(args.save_features)), exist_ok=True)
            np.save(args.save_features, img_feats)
            print(f"saved image features {list(img_feats.shape)} to {args.save_features}")

    unique_templates, template_feats = ijb.image_to_template_features(
        img_feats, meta["faceness"], meta["templates"], meta["medias"], use_flip_test=args.flip_test,
        flip_mode=args.flip_mode, use_norm_score=args.norm_score, use_detector_score=args.detector_score)
    del img_feats  # [N, 2F] is ~1.8 GiB at IJB-C size; free it before scoring and the ROC
    scores = ijb.pair_scores(unique_templates, template_feats, meta["t1"], meta["t2"])
    tar, fpr, tpr = ijb.tar_at_far(meta["label"], scores)

    print("1:1 verification, TAR (%) at FAR:")
    print(tar_table(args.target, tar))
    np.save(os.path.join(out_dir, f"{name}.npy"), scores)
    np.savez(os.path.join(out_dir, f"{name}_roc.npz"), fpr=fpr, tpr=tpr, label=f"{args.job}-{args.target}")
    write_table(os.path.join(out_dir, f"{name}_tar_far"), [f"{x:g}" for x in ijb.FAR_TARGETS],
                tar_row_name(args.target), tar * 100)
    # ROC as the release writes it (<target>.pdf) and as a PNG for quick viewing; the curve is labelled by job
    # so tools/plot_roc.py can overlay several result folders.
    for path in (os.path.join(out_dir, f"{name}.pdf"), os.path.join(out_dir, f"{name}_roc.png")):
        ijb.plot_roc([(f"{args.job}-{args.target}", fpr, tpr)], path)
    run_1n(args, unique_templates, template_feats, out_dir, name)
    print(f"results in {out_dir}")


if __name__ == "__main__":
    run_main(main)
