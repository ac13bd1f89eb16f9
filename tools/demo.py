"""The whole system on a CPU in minutes: make the synthetic demo faces (if absent), train a small TransFace on
them with configs/demo.py, then evaluate it with the IJB-C protocol on the held-out demo identities, and show the
result next to the band of results docs/demo.md states (tools/demo_band.json).

    python tools/demo.py                   # everything
    python tools/demo.py --skip-train      # evaluate the existing work_dirs/demo/model.pt again
    python tools/demo.py --opts num_epoch=2  # shorter training (any config override)

The console shows one progress bar per phase and the result tables; the config dump and the release-format
training log go to <output>/training.log only.
"""
import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys

import scipy.stats
import torch
from prettytable import PrettyTable
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import count_steps  # noqa: E402
from utils.amp import resolve_amp  # noqa: E402
from utils.cli import UserError, run_main, run_script  # noqa: E402
from utils.utils_config import REPO_ROOT, get_config  # noqa: E402

BAND_FILE = os.path.join(REPO_ROOT, "tools", "demo_band.json")
METRICS = ("TAR@1e-4", "TAR@1e-3", "TAR@1e-2", "rank-1", "lfw")
# Lines the console leaves to training.log: the release-format config dump, speed and verification lines, the amp
# note and the routine clean-up of old checkpoint sets. Anything else train.py logs (warnings, resume notes) still
# reaches the console.
_LOG_ONLY = re.compile(r"^Training: [\d-]+ [\d:,]+-(?:: |Speed |\[[^\]]+\]\[\d+\]|amp=auto: |removed checkpoint set )")
_STEP = re.compile(r"Global Step: (\d+)")
_LFW = re.compile(r"\[lfw\]\[\d+\]Accuracy-Flip: ([\d.]+)")


def train_with_progress(command, total_step):
    """Run train.py with its stdout (the log lines training.log also gets) turned into one progress bar."""
    print("+ " + " ".join(command), flush=True)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    with tqdm(total=total_step, desc="training", unit="step") as bar:
        for line in proc.stdout:
            step, lfw = _STEP.search(line), _LFW.search(line)
            if step:
                bar.update(int(step.group(1)) - bar.n)
            if lfw:
                bar.set_postfix(lfw=f"{float(lfw.group(1)) * 100:.2f}%")
            if not _LOG_ONLY.match(line):
                bar.write(line.rstrip("\n"))
        if proc.wait() == 0:
            bar.update(total_step - bar.n)
    if proc.returncode != 0:
        raise UserError(f"train.py: exited with status {proc.returncode} (see its error above)")


def total_steps(cfg):
    """Optimizer steps of a one-process run of cfg (train.py's count, per epoch, times the epochs)."""
    return count_steps(cfg, cfg.num_image, 1) * cfg.num_epoch  # num_image: no bound from the loader's length


def read_result_row(path):
    """The result row of one of eval_ijbc.py's CSV tables as {column: value}."""
    try:
        with open(path, newline="") as handle:
            header, row = list(csv.reader(handle))[:2]
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no result table ({e})") from e
    return {key: float(value) for key, value in zip(header[1:], row[1:])}


def read_results(output, job="demo"):
    """The demo's headline numbers of a finished run in `output`: TAR (%) at FAR 1e-4/1e-3/1e-2, rank-1 (%) and the
    last lfw accuracy (%) in training.log (None when lfw was not checked)."""
    tar = read_result_row(os.path.join(output, job, "ijbc_tar_far.csv"))
    one_n = read_result_row(os.path.join(output, job, "ijbc_1n.csv"))
    lfw = None
    log = os.path.join(output, "training.log")
    if os.path.isfile(log):
        with open(log) as handle:
            found = _LFW.findall(handle.read())
        lfw = float(found[-1]) * 100 if found else None
    return {"TAR@1e-4": tar["0.0001"], "TAR@1e-3": tar["0.001"], "TAR@1e-2": tar["0.01"], "rank-1": one_n["rank-1"],
            "lfw": lfw}


def band_of(runs):
    """{metric: (mean, min, max)} over runs (dicts of METRICS)."""
    out = {}
    for metric in METRICS:
        values = [run[metric] for run in runs if run.get(metric) is not None]
        if values:
            out[metric] = (sum(values) / len(values), min(values), max(values))
    return out


def load_band(path=BAND_FILE):
    with open(path) as handle:
        return json.load(handle)


def seed_noise_range(values, probability=0.99):
    """Where one more run lands with `probability` when runs differ only by seed noise: the two-sided prediction
    interval of a normal sample, mean +- t(n-1) * sd * sqrt(1 + 1/n). Another machine's kernels act like another
    seed, so a run there may leave [min, max] of the measured runs (2 in 11 per metric for 10 runs) yet stay in this."""
    n, mean = len(values), statistics.mean(values)
    if n < 2:
        return mean, mean
    half = scipy.stats.t.ppf((1 + probability) / 2, n - 1) * statistics.stdev(values) * (1 + 1 / n) ** 0.5
    return mean - half, mean + half


def band_table(result, runs):
    """This run next to the band of `runs`: one row per metric with its verdict -- 'yes' inside [min, max], 'noise'
    outside it but inside the seed-noise range, 'NO' beyond that -- and the worst verdict over the metrics."""
    table = PrettyTable(["metric (%)", "this run", "band mean", "band min", "band max", "seed-noise range", "inside"])
    verdicts = []
    for metric, (mean, low, high) in band_of(runs).items():
        value = result.get(metric)
        noise_low, noise_high = seed_noise_range([run[metric] for run in runs if run.get(metric) is not None])
        eps = 5e-3  # the band is stored to 2 decimals
        if value is not None and low - eps <= value <= high + eps:
            verdicts.append("yes")
        elif value is not None and noise_low <= value <= noise_high:
            verdicts.append("noise")
        else:
            verdicts.append("NO")
        table.add_row([metric, "-" if value is None else f"{value:.2f}", f"{mean:.2f}", f"{low:.2f}", f"{high:.2f}",
                       f"{noise_low:.2f} - {noise_high:.2f}", verdicts[-1]])
    worst = "NO" if "NO" in verdicts else "noise" if "noise" in verdicts else "yes"
    return table, worst


VERDICT_LINE = {
    "yes": "inside the band: yes",
    "noise": "inside the band: within seed noise (outside [min, max] on a metric marked 'noise', inside the range "
             "99 % of runs reach when only the seed or the machine's kernels differ)",
    "NO": "inside the band: NO - beyond seed noise: a changed config or data, or a machine unlike those measured "
          "(docs/demo.md)"}


def show_band(result, amp, band_file=BAND_FILE):
    if not os.path.isfile(band_file):
        return
    stored = load_band(band_file)
    table, verdict = band_table(result, stored["runs"])
    seeds = sorted({run["seed"] for run in stored["runs"]})
    amps = sorted({run["amp"] for run in stored["runs"]})
    print(f"\nThis run ({amp}) and the band of {len(stored['runs'])} runs in docs/demo.md "
          f"({len(seeds)} seeds x {'/'.join(amps)}; {stored['command']}):")
    print(table)
    print(VERDICT_LINE[verdict])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data", default="demo_data", help="where the generated data lives")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--band", default=BAND_FILE, help="the stored band of results to compare with")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args()

    opts = [f"rec={os.path.join(args.data, 'train')}"] + args.opts
    cfg = get_config(os.path.join(REPO_ROOT, args.config), opts)
    if not os.path.isfile(os.path.join(REPO_ROOT, args.data, "train", "train.rec")):
        run_script([sys.executable, "tools/make_demo_data.py", "--out", args.data], REPO_ROOT)
    if not args.skip_train:
        train_with_progress([sys.executable, "train.py", "--config", args.config, "--opts", *opts], total_steps(cfg))
        print(f"training log, config and checkpoints: {cfg.output}/")
    run_script([sys.executable, "eval_ijbc.py", "--model-prefix", os.path.join(cfg.output, "model.pt"),
                "--image-path", os.path.join(args.data, "ijbc"), "--result-dir", cfg.output, "--job", "demo",
                "--network", cfg.network,
                "--network-kwargs", json.dumps(dict(cfg.network_kwargs, num_features=cfg.embedding_size)),
                "--batch-size", "64", "--num-workers", "0"], REPO_ROOT)
    amp = resolve_amp(cfg.amp, "cuda" if torch.cuda.is_available() else "cpu")
    show_band(read_results(os.path.join(REPO_ROOT, cfg.output)), amp, args.band)


if __name__ == "__main__":
    run_main(main)
