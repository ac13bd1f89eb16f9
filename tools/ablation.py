"""DPAP / EHSM ablation on the demo data: the demo's config trained with DPAP and EHSM switched on and off (plain
ViT, +DPAP, +EHSM, +both), each over the same seeds, evaluated with the IJB-C protocol. Prints mean +- standard
deviation over the seeds and whether each variant's difference from the plain ViT exceeds the seed spread.

    python tools/ablation.py                               # 4 variants x 5 seeds at the demo's precision
    python tools/ablation.py --seeds 2048 2049 --opts num_epoch=3   # fewer seeds, a shorter budget

Runs live in <output>/<variant>_<amp>_seed<seed>/ next to tools/demo_band.py's (the +DPAP +EHSM runs are the
band's); a run whose results exist is read, not trained again.
"""
import argparse
import os
import statistics
import sys

import torch
from prettytable import PrettyTable, TableStyle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.demo_band import SEEDS, demo_run  # noqa: E402
from utils.amp import resolve_amp  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.utils_config import REPO_ROOT, get_config  # noqa: E402

VARIANTS = (("baseline ViT", "vit", False, False), ("+DPAP", "dpap", True, False), ("+EHSM", "ehsm", False, True),
            ("+DPAP +EHSM", "transface", True, True))
ABLATION_METRICS = ("TAR@1e-4", "TAR@1e-3", "TAR@1e-2", "rank-1")


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def exceeds_spread(a, b):
    """True when the means of a and b differ by more than twice the standard error of that difference (about 95 %
    two-sided for normal seed noise): the difference is not explained by the seed alone."""
    if len(a) < 2 or len(b) < 2:
        return False
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    return abs(mean_a - mean_b) > 2 * (std_a ** 2 / len(a) + std_b ** 2 / len(b)) ** 0.5


def ablation_table(results):
    """results: {variant name: {metric: [value per seed]}} -> table of mean +- std and, per metric, the difference
    from the first variant with '*' where it exceeds the seed spread."""
    names = list(results)
    base = results[names[0]]
    table = PrettyTable(["variant", "seeds"] + [f"{m} mean +- std" for m in ABLATION_METRICS]
                        + [f"diff {m}" for m in ABLATION_METRICS])
    for name in names:
        row = results[name]
        cells = [f"{mean:.2f} +- {std:.2f}" for mean, std in (mean_std(row[m]) for m in ABLATION_METRICS)]
        diffs = ["" if name == names[0] else
                 f"{mean_std(row[m])[0] - mean_std(base[m])[0]:+.2f}{' *' if exceeds_spread(row[m], base[m]) else ''}"
                 for m in ABLATION_METRICS]
        table.add_row([name, len(row[ABLATION_METRICS[0]])] + cells + diffs)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--output", default="work_dirs/demo_runs",
                        help="runs folder; give each other --config/--opts budget its own, as finished runs are reused")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides applied to every run")
    args = parser.parse_args()

    cfg = get_config(os.path.join(REPO_ROOT, args.config), args.opts)
    amp = resolve_amp(cfg.amp, "cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for name, tag, use_dpap, use_ehsm in VARIANTS:
        results[name] = {m: [] for m in ABLATION_METRICS}
        for seed in args.seeds:
            run = demo_run(args.output, args.data, tag, amp, seed, [f"dpap={use_dpap}", f"ehsm={use_ehsm}", *args.opts],
                           args.config)
            for m in ABLATION_METRICS:
                results[name][m].append(run[m])
    table = ablation_table(results)
    print(f"{amp}, seeds {' '.join(map(str, args.seeds))}; '*': the difference from the baseline exceeds twice its "
          f"standard error over the seeds")
    print(table)
    with open(os.path.join(REPO_ROOT, args.output, "ablation.md"), "w") as handle:
        table.set_style(TableStyle.MARKDOWN)
        handle.write(table.get_string() + "\n")


if __name__ == "__main__":
    run_main(main)
