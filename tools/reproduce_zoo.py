"""Re-measure the model zoo on IJB-C: our TAR next to the published one, for every checkpoint you downloaded.

    python tools/reproduce_zoo.py --zoo-dir checkpoints/ --image-path /data/IJB_release/IJBC -o work_dirs/zoo

--zoo-dir holds the downloads under the file names of eval/zoo.py (e.g. glint360k_model_TransFace_L.pt); files
that are absent are listed and skipped. Each present file is evaluated with eval_ijbc.py's protocol and defaults
(5-point alignment, flip added, norm and detector-score weighting) and --network from the zoo table. Image features
are cached in <out>/<file stem>/features.npy; a re-run with the same checkpoint only re-scores. Writes
<out>/zoo_ijbc.md (rounded like the paper) and <out>/zoo_ijbc.csv (full precision) and prints the markdown.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_ijbc  # noqa: E402
from eval import ijb  # noqa: E402
from eval.zoo import ZOO, far_label  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.npio import ArrayFileError, load_array  # noqa: E402


def eval_args(entry, checkpoint, image_path, batch_size, num_workers, amp):
    """eval_ijbc.py's arguments for one zoo file: the same defaults as the command line."""
    return eval_ijbc.parse_args([
        "--model-prefix", checkpoint, "--image-path", image_path, "--network", entry.network,
        "--network-kwargs", json.dumps(entry.network_kwargs), "--batch-size", str(batch_size),
        "--num-workers", str(num_workers), *(["--amp", amp] if amp else [])])


def features_stamp(args, device):
    """What the cached features depend on: the checkpoint (path, size, mtime), the network and the protocol."""
    stat = os.stat(args.model_prefix)
    return dict(checkpoint=os.path.abspath(args.model_prefix), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                network=args.network, network_kwargs=args.network_kwargs, image_size=args.image_size,
                amp=args.amp or eval_ijbc.default_amp(args.network, device),
                image_path=os.path.abspath(args.image_path))


def cached_features(args, meta, cache_dir, device):
    """Image features [N, 2F] of one checkpoint: read from cache_dir/features.npy if it was written for the same
    stamp, otherwise extracted (eval_ijbc.extract_features) and saved there. -> (features, 'cached'/'extracted')."""
    path, stamp_path = os.path.join(cache_dir, "features.npy"), os.path.join(cache_dir, "features.json")
    stamp = features_stamp(args, device)
    if os.path.isfile(path) and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                try:  # a cache of another shape or a damaged one is extracted again
                    return load_array(path, kinds="f", shape=(len(meta["names"]), None)), "cached"
                except ArrayFileError:
                    pass
    feats = eval_ijbc.extract_features(args, meta, device)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:  # write then rename: an interrupted run never leaves a half-written cache
        np.save(f, feats)
    os.replace(tmp, path)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=1)
    return feats, "extracted"


def measure(args, meta, feats):
    """TAR (%) at ijb.FAR_TARGETS from image features, with eval_ijbc.py's switches."""
    unique_templates, template_feats = ijb.image_to_template_features(
        feats, meta["faceness"], meta["templates"], meta["medias"], use_flip_test=args.flip_test,
        flip_mode=args.flip_mode, use_norm_score=args.norm_score, use_detector_score=args.detector_score)
    scores = ijb.pair_scores(unique_templates, template_feats, meta["t1"], meta["t2"])
    tar, _, _ = ijb.tar_at_far(meta["label"], scores)
    return tar * 100


def reproduce(zoo_dir, image_path, out_dir, zoo=ZOO, device=None, batch_size=128, num_workers=4, amp=None):
    """-> list of (entry, measured TAR % array or None when the file is absent from zoo_dir), in zoo order."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta, results = None, []
    for entry in zoo:
        checkpoint = os.path.join(zoo_dir, entry.file)
        if not os.path.isfile(checkpoint):
            results.append((entry, None))
            continue
        if meta is None:  # read once, and only when there is something to evaluate
            meta = ijb.read_meta(image_path, "IJBC")
        args = eval_args(entry, checkpoint, image_path, batch_size, num_workers, amp)
        cache_dir = os.path.join(out_dir, os.path.splitext(entry.file)[0])
        feats, how = cached_features(args, meta, cache_dir, device)
        print(f"{entry.file}: features {how} ({cache_dir}/features.npy)")
        results.append((entry, measure(args, meta, feats)))
    return results


def markdown(results):
    """Zoo table with one 'ours / published (difference)' cell per FAR, then the list of absent files."""
    header = ["Training data", "Model", "`--network`", "file"] + [f"TAR@{far_label(x)}" for x in ijb.FAR_TARGETS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * 4 + " ---: |" * len(ijb.FAR_TARGETS)]
    for entry, tar in results:
        if tar is None:
            cells = [f"— / {p:.2f}" for p in entry.ijbc_tar]
        else:
            cells = [f"{m:.2f} / {p:.2f} ({m - p:+.2f})" for m, p in zip(tar, entry.ijbc_tar)]
        lines.append(f"| {entry.data} | {entry.model} | `{entry.network}` | {entry.file} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: measured / published (measured - published), TAR % on IJB-C; — : file not found.")
    missing = [entry.file for entry, tar in results if tar is None]
    lines.append("Missing: " + (", ".join(missing) if missing else "none"))
    return "\n".join(lines) + "\n"


def write_csv(path, results):
    """One row per zoo entry: status, and published / measured / difference per FAR at full precision."""
    fars = [far_label(x) for x in ijb.FAR_TARGETS]
    header = ["data", "model", "network", "file", "status"]
    header += [f"{kind}_{far}" for far in fars for kind in ("published", "measured", "difference")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for entry, tar in results:
            row = [entry.data, entry.model, entry.network, entry.file, "missing" if tar is None else "measured"]
            for i, published in enumerate(entry.ijbc_tar):
                measured = "" if tar is None else repr(float(tar[i]))
                difference = "" if tar is None else repr(float(tar[i]) - published)
                row += [repr(published), measured, difference]
            writer.writerow(row)


def main(argv=None, zoo=ZOO):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo-dir", required=True, help="folder with the downloaded zoo checkpoints")
    parser.add_argument("--image-path", required=True, help="IJB-C root holding loose_crop/ and meta/")
    parser.add_argument("-o", "--output", default="work_dirs/zoo", help="output folder (tables, feature caches)")
    parser.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--amp", default=None, choices=list(eval_ijbc.AMP_DTYPES),
                        help="as eval_ijbc.py: default fp16 for a ViT on CUDA (the release's numerics), else none")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.zoo_dir):
        parser.error(f"--zoo-dir {args.zoo_dir} is not a folder")
    results = reproduce(args.zoo_dir, args.image_path, args.output, zoo, args.device, args.batch_size,
                        args.num_workers, args.amp)
    os.makedirs(args.output, exist_ok=True)
    table = markdown(results)
    with open(os.path.join(args.output, "zoo_ijbc.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(args.output, "zoo_ijbc.csv"), results)
    print(table, end="")
    print(f"tables in {args.output}/zoo_ijbc.md and .csv")
    return results


if __name__ == "__main__":
    run_main(main)
