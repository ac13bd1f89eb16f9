"""Training curves of one or more runs in one figure: loss, learning rate, samples/s, fp16 grad scale and each
verification target's accuracy against the global step, runs overlaid; optionally over the released TransFace's own
MS1MV2 training curves, on the fraction of training.

    python tools/plot_training.py work_dirs/ms1mv2_vit_s/training.log work_dirs/baseline/training.log -o curves.png
    python tools/plot_training.py work_dirs/ms1mv2_vit_s/tensorboard --labels transface
    python tools/plot_training.py work_dirs/ms1mv2_vit_s --release vit_s -o curves.png   # next to the release's
    python tools/plot_training.py --release all -o release.png                          # the release's alone

A run is a training.log (this repository's, the released TransFace's or arcface_torch's: the speed line
"Speed ... samples/sec   Loss ...   LearningRate ...   Epoch: e   Global Step: s ..." and the verification lines
"[name][step]Accuracy-Flip: acc+-std" are the same after each logger's own prefix), an output folder holding
training.log, or a TensorBoard folder (scalars loss, learning_rate, samples_per_sec, <name>/accuracy).
--release adds the release's logs of configs/ms1mv2_vit_{s,b,l}.py (tools/release_logs/); every step is then
divided by its run's total_step (from the log's config lines), so runs of any length line up. Each run's summary
(loss at the start, at the warm-up end, after 10 epochs and at the end; LR peak; grad-scale drops) is printed.
"""
import argparse
import csv
import gzip
import math
import os
import re
import sys
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402

NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
# Searched anywhere in a line, so the prefix ("Training: <time>-" here and in the release, "<time>-rank0-" in this
# repository's older logs) is free.
SPEED_LINE = re.compile(rf"Speed\s+{NUMBER}\s+samples/sec\s+Loss\s+{NUMBER}\s+LearningRate\s+{NUMBER}\s+"
                        rf"Epoch:\s*(\d+)\s+Global Step:\s*(\d+)(?:\s+Fp16 Grad Scale:\s*{NUMBER})?")
ACCURACY_LINE = re.compile(rf"\[([^\]]+)\]\[(\d+)\]Accuracy-Flip:\s*{NUMBER}\s*\+-\s*{NUMBER}")
CONFIG_LINE = re.compile(r": (total_step|warmup_step)\s+(\d+)\s*$")  # from the config dump at the top of the log
SERIES = ("loss", "lr", "speed", "scale")  # per-step series of every run; accuracies are per target
TENSORBOARD_TAGS = {"loss": "loss", "lr": "learning_rate", "speed": "samples_per_sec", "scale": "grad_scale"}
TITLES = {"loss": "loss", "lr": "learning rate", "speed": "samples/s (all ranks)", "scale": "fp16 grad scale"}
RELEASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_logs")
RELEASES = {"vit_s": "TransFace-S", "vit_b": "TransFace-B", "vit_l": "TransFace-L"}


def empty_run(label):
    return {"label": label, **{name: ([], []) for name in SERIES}, "epoch": ([], []), "accuracy": {},
            "total_step": None, "warmup_step": None, "release": False}


def add(series, step, value):
    series[0].append(step)
    series[1].append(value)


def parse_line(line, run):
    """Add the numbers of one log line to `run`; -> True if the line was a speed or accuracy line."""
    m = SPEED_LINE.search(line)
    if m:
        speed, loss, lr, epoch, step, scale = m.groups()
        for name, value in (("loss", loss), ("lr", lr), ("speed", speed), ("epoch", epoch), ("scale", scale)):
            if value is not None:
                add(run[name], int(step), float(value))
        return True
    m = ACCURACY_LINE.search(line)
    if m:
        name, step, accuracy, _std = m.groups()
        add(run["accuracy"].setdefault(name, ([], [])), int(step), float(accuracy))
        return True
    m = CONFIG_LINE.search(line)
    if m:
        run[m.group(1)] = int(m.group(2))
    return False


def read_log(path, label=None):
    run = empty_run(label or os.path.basename(os.path.dirname(os.path.abspath(path))))
    with open(path, errors="replace") as f:
        found = sum(parse_line(line, run) for line in f)
    if not found:
        raise ValueError(f"{path}: no 'Speed ... Loss ... Global Step: N' or '[name][step]Accuracy-Flip:' lines")
    return run


def read_release(name):
    """The release's MS1MV2 log of configs/ms1mv2_<name>.py as a run (tools/release_logs/README.md)."""
    path = os.path.join(RELEASE_DIR, f"ms1mv2_{name}.csv.gz")
    run = empty_run(f"{RELEASES[name]} (release, MS1MV2)")
    run["release"] = True
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    config = dict(item.split("=") for line in lines if line.startswith("# config: ")
                  for item in line[len("# config: "):].split("; "))
    run["total_step"], run["warmup_step"] = int(config["total_step"]), int(config["warmup_step"])
    for row in csv.DictReader(line for line in lines if not line.startswith("#")):
        step = int(row["global_step"])
        for key, column in (("loss", "loss"), ("lr", "lr"), ("epoch", "epoch"), ("scale", "fp16_grad_scale")):
            add(run[key], step, float(row[column]))
    return run


def read_tensorboard(folder, label=None):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    tags = events.Tags()["scalars"]
    if not tags:
        raise ValueError(f"{folder}: no TensorBoard scalars found")
    name = os.path.basename(os.path.normpath(folder))
    run = empty_run(label or (os.path.basename(os.path.dirname(os.path.abspath(folder))) if name == "tensorboard"
                              else name))
    for key, tag in TENSORBOARD_TAGS.items():
        if tag in tags:
            for event in events.Scalars(tag):
                add(run[key], event.step, event.value)
    for tag in tags:
        if tag.endswith("/accuracy"):
            series = run["accuracy"].setdefault(tag[:-len("/accuracy")], ([], []))
            for event in events.Scalars(tag):
                add(series, event.step, event.value)
    return run


def read_run(path, label=None):
    """A training.log, a folder holding training.log, or a TensorBoard folder."""
    if os.path.isfile(path):
        return read_log(path, label)
    if os.path.isfile(os.path.join(path, "training.log")):
        return read_log(os.path.join(path, "training.log"), label)
    if os.path.isdir(path):
        return read_tensorboard(path, label)
    raise FileNotFoundError(f"{path}: neither a training.log nor a folder")


def total_steps(run):
    """The run's length in steps: total_step from its log's config lines, else its last logged step."""
    steps = run["loss"][0] + [step for series in run["accuracy"].values() for step in series[0]]
    return run["total_step"] or max(steps, default=1)


def plot(runs, path, fraction=False):
    """One panel per series (loss, lr, samples/s, grad scale, then each target's accuracy) that any run has, every
    run in each, against the global step or (fraction=True) the fraction of the run's total steps; -> figure."""
    targets = sorted({name for run in runs for name in run["accuracy"]})
    panels = [(TITLES[name], [run[name] for run in runs]) for name in SERIES
              if name in ("loss", "lr") or any(run[name][0] for run in runs)]
    panels += [(f"{name} accuracy (flip)", [run["accuracy"].get(name, ([], [])) for run in runs])
               for name in targets]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for run, (steps, values) in zip(runs, series):
            total = total_steps(run) if fraction else 1
            style = dict(linewidth=0.8, alpha=0.75) if run["release"] else dict(linewidth=1.8)
            marker = "o" if "accuracy" in title or len(steps) < 30 else None
            ax.plot([step / total for step in steps], values, marker=marker, markersize=3, label=run["label"],
                    **style)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("fraction of training (global step / total steps)" if fraction else "global step")
        ax.grid(alpha=0.3)
        if title == TITLES["scale"]:
            ax.set_yscale("log", base=2)
        elif title == TITLES["loss"] and fraction:
            ax.set_yscale("log")  # the release ends near 1, a short run far above it
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def value_at(series, step):
    """(logged step, value) of the series' last logged point at or before `step`, else its first."""
    steps, values = series
    i = max([k for k, s in enumerate(steps) if s <= step], default=0)
    return steps[i], values[i]


def power_of_two(x):
    return f"2^{math.log2(x):g}" if x > 0 else f"{x:g}"


def summary(run):
    """One line of what to compare a run by: loss at the start, at the warm-up end, after 10 epochs (the last line
    of epoch index 9) and at the end; LR peak; the fp16 grad scale's range and drops."""
    steps = run["loss"][0]
    if not steps:
        return f"{run['label']}: no speed lines"
    points = [("start", steps[0])]
    if run["warmup_step"]:
        points.append((f"warm-up end: {run['warmup_step']}", run["warmup_step"]))
    tenth = [s for s, e in zip(*run["epoch"]) if e == 9]
    if tenth:
        points.append(("after 10 epochs", tenth[-1]))
    points.append(("end", steps[-1]))
    at = [value_at(run["loss"], step) + (where,) for where, step in points]
    parts = [f"{loss:.2f} at step {step} ({where})" for step, loss, where in at]
    total = f" of {run['total_step']}" if run["total_step"] else ""
    text = f"{run['label']}: steps {steps[0]}..{steps[-1]}{total}; loss {', '.join(parts)}"
    lr_steps, lrs = run["lr"]
    if lrs:
        peak = max(range(len(lrs)), key=lrs.__getitem__)
        text += f"; LR peak {lrs[peak]:g} at step {lr_steps[peak]}"
    scale_steps, scales = run["scale"]
    if scales:
        drops = sum(b < a for a, b in zip(scales, scales[1:]))
        common, count = Counter(scales).most_common(1)[0]
        text += (f"; fp16 grad scale {power_of_two(min(scales))}..{power_of_two(max(scales))}, "
                 f"{power_of_two(common)} on {100 * count / len(scales):.0f} % of the lines, {drops} drops")
        if drops:
            text += f" (one per {(scale_steps[-1] - scale_steps[0]) / drops:.0f} steps)"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="training.log files, output folders or TensorBoard folders")
    parser.add_argument("--labels", nargs="*", default=None, help="legend entries, one per run")
    parser.add_argument("--release", choices=[*RELEASES, "all"], default=None,
                        help="add the released TransFace's MS1MV2 training log(s) and plot on the fraction of "
                             "training")
    parser.add_argument("-o", "--output", default="training_curves.png", help="figure path (.png or .pdf)")
    args = parser.parse_args(argv)
    if not args.runs and not args.release:
        parser.error("give at least one run or --release")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} given for {len(args.runs)} runs")
    try:
        runs = [read_run(path, args.labels[i] if args.labels else None) for i, path in enumerate(args.runs)]
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    releases = list(RELEASES) if args.release == "all" else [args.release] if args.release else []
    runs += [read_release(name) for name in releases]
    plt.close(plot(runs, args.output, fraction=bool(releases)))
    for run in runs:
        print(summary(run) + (f"; verification targets {sorted(run['accuracy'])}" if run["accuracy"] else ""))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
