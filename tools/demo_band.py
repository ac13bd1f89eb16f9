"""The band of results docs/demo.md states for the README's demo: `tools/demo.py` trained with several seeds in both
precisions the demo may pick (bf16 on a CPU with native bf16, float32 elsewhere), mean/min/max per metric.

    python tools/demo_band.py                          # 5 seeds x bf16/float32 (~10 demo trainings)
    python tools/demo_band.py --seeds 2048 --amp bf16  # a subset (runs already done are read, not redone)
    python tools/demo_band.py --write                  # also store the band in tools/demo_band.json
    python tools/demo_band.py --finished-only --write  # the band of the runs done so far

Each run lives in <output>/transface_<amp>_seed<seed>/ on the shared demo data; a run whose results exist is not
trained again, so a sweep can be split over several invocations. tools/demo.py prints its own result next to the
stored band.
"""
import argparse
import json
import os
import sys

from prettytable import PrettyTable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.demo import BAND_FILE, METRICS, band_of, read_results  # noqa: E402
from utils.cli import run_main, run_script  # noqa: E402
from utils.utils_config import REPO_ROOT  # noqa: E402

SEEDS = (2048, 2049, 2050, 2051, 2052)  # 2048 is the config's seed: the demo's own run
COMMAND = "python tools/demo.py"


def run_dir(root, variant, amp, seed):
    return os.path.join(root, f"{variant}_{amp}_seed{seed}")


def finished(output):
    return os.path.isfile(os.path.join(REPO_ROOT, output, "demo", "ijbc_1n.csv"))


def demo_run(root, data, variant, amp, seed, opts=(), config="configs/demo.py"):
    """Train and evaluate one demo run unless its results exist; -> its results (tools.demo.read_results)."""
    output = run_dir(root, variant, amp, seed)
    if not finished(output):
        run_script([sys.executable, "tools/demo.py", "--config", config, "--data", data, "--opts", f"output={output}",
                    f"seed={seed}", f"amp={amp}", *opts], REPO_ROOT)
    return read_results(os.path.join(REPO_ROOT, output))


def summary_table(runs, key):
    """Mean/min/max of every metric per group of runs (`key(run)` names the group), then over all runs."""
    table = PrettyTable(["runs", "n"] + [f"{m} mean [min, max]" for m in METRICS])
    groups = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    for name, group in [*groups.items(), ("all", runs)]:
        band = band_of(group)
        table.add_row([name, len(group)] + [f"{band[m][0]:.2f} [{band[m][1]:.2f}, {band[m][2]:.2f}]" if m in band
                                            else "-" for m in METRICS])
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--amp", nargs="+", default=["bf16", "none"], choices=["bf16", "none"])
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--output", default="work_dirs/demo_runs")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides for every run (another budget: give "
                        "it its own --output, as finished runs are reused)")
    parser.add_argument("--finished-only", action="store_true", help="train nothing: the band of the runs that exist")
    parser.add_argument("--write", nargs="?", const=BAND_FILE, default=None,
                        help=f"store the band (default file: {os.path.relpath(BAND_FILE, REPO_ROOT)})")
    args = parser.parse_args()

    runs = []
    for amp in args.amp:
        for seed in args.seeds:
            if args.finished_only and not finished(run_dir(args.output, "transface", amp, seed)):
                continue
            runs.append(dict(amp=amp, seed=seed, **demo_run(args.output, args.data, "transface", amp, seed, args.opts)))
    table = PrettyTable(["amp", "seed"] + list(METRICS))
    for run in runs:
        table.add_row([run["amp"], run["seed"]] + ["-" if run[m] is None else f"{run[m]:.2f}" for m in METRICS])
    print(table)
    print(summary_table(runs, lambda run: run["amp"]))
    if args.write:
        command = " ".join([COMMAND, *(["--opts", *args.opts] if args.opts else [])])
        stored = [{k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()} for run in runs]
        with open(args.write, "w") as handle:
            json.dump({"command": command, "runs": stored}, handle, indent=1)
            handle.write("\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    run_main(main)
