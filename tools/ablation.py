"""DPAP / EHSM ablation on the demo data: the same config, seed and budget trained four times
(plain ViT, +DPAP, +EHSM, +both), each evaluated with the IJB-C protocol, printed as one table.

    python tools/ablation.py                      # configs/demo.py, ~4x the demo's training time
    python tools/ablation.py --opts num_epoch=3   # a shorter budget for all four runs
"""
import argparse
import csv
import os
import sys

from prettytable import PrettyTable, TableStyle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main, run_script  # noqa: E402
from utils.utils_config import REPO_ROOT, get_config  # noqa: E402

VARIANTS = (("baseline ViT", False, False), ("+DPAP", True, False), ("+EHSM", False, True), ("+DPAP +EHSM", True, True))


def read_tar_table(path):
    """The TAR@FAR row of eval_ijbc.py's CSV as {far: tar%}."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, values = rows[0], rows[-1]
    return {far: f"{float(value):.2f}" for far, value in zip(header[1:], values[1:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--output", default="work_dirs/ablation")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides applied to every run")
    args = parser.parse_args()

    table = None
    for name, use_dpap, use_ehsm in VARIANTS:
        tag = name.replace("+", "").replace(" ", "_").lower()
        output = os.path.join(args.output, tag)
        opts = [f"output={output}", f"dpap={use_dpap}", f"ehsm={use_ehsm}", "export_onnx=False"] + args.opts
        run_script([sys.executable, "tools/demo.py", "--config", args.config, "--data", args.data, "--opts", *opts],
                   REPO_ROOT)
        cfg = get_config(os.path.join(REPO_ROOT, args.config), opts)
        tars = read_tar_table(os.path.join(REPO_ROOT, cfg.output, "demo", "ijbc_tar_far.csv"))
        if table is None:
            table = PrettyTable(["variant", "DPAP", "EHSM"] + [f"TAR@{far}" for far in tars])
        table.add_row([name, use_dpap, use_ehsm] + list(tars.values()))
    print(table)
    with open(os.path.join(REPO_ROOT, args.output, "ablation.md"), "w") as handle:
        table.set_style(TableStyle.MARKDOWN)
        handle.write(table.get_string() + "\n")


if __name__ == "__main__":
    run_main(main)
