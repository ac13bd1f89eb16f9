"""Draw the IJB ROC curves of several eval_ijbc.py result folders in one figure.

    python tools/plot_roc.py work_dirs/vit_s/insightface work_dirs/vit_l/insightface --target IJBC -o roc.png

Each folder must hold <target>_roc.npz written by eval_ijbc.py; the legend uses the folder's row name
(job-target) unless --labels are given.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval.ijb import plot_roc  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.npio import load_array  # noqa: E402


def read_roc(path):
    """(row name, fpr, tpr) of a <target>_roc.npz written by eval_ijbc.py."""
    fpr = load_array(path, "false positive rates (float [K])", shape=(None,), key="fpr")
    tpr = load_array(path, f"true positive rates (float [{len(fpr)}])", shape=(len(fpr),), key="tpr")
    label = load_array(path, "the row name (a string)", kinds="U", shape=(), key="label")
    return str(label), fpr, tpr


def main(argv=None):
    parser = argparse.ArgumentParser(description="overlay ROC curves of eval_ijbc.py result folders")
    parser.add_argument("folders", nargs="+", help="<result-dir>/<job> folders")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--labels", nargs="*", default=None, help="legend entries, one per folder")
    parser.add_argument("-o", "--output", default="roc.png", help="figure path (.png or .pdf)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.folders):
        parser.error(f"--labels: {len(args.labels)} given for {len(args.folders)} folders")
    curves = []
    for i, folder in enumerate(args.folders):
        path = os.path.join(folder, f"{args.target.lower()}_roc.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (run eval_ijbc.py with --result-dir/--job pointing there)")
        row, fpr, tpr = read_roc(path)
        curves.append((args.labels[i] if args.labels else f"{os.path.basename(os.path.normpath(folder))}: {row}",
                       fpr, tpr))
    plot_roc(curves, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
