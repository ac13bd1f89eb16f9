"""Training curves of one or more runs in one figure: loss, learning rate, samples/s and each verification
target's accuracy against the global step, runs overlaid.

    python tools/plot_training.py work_dirs/ms1mv2_vit_s/training.log work_dirs/baseline/training.log -o curves.png
    python tools/plot_training.py work_dirs/ms1mv2_vit_s/tensorboard --labels transface

A run is a training.log (this repository's, the released TransFace's or arcface_torch's: the speed line
"Speed ... samples/sec   Loss ...   LearningRate ...   Epoch: e   Global Step: s ..." and the verification lines
"[name][step]Accuracy-Flip: acc+-std" are the same after each logger's own prefix), an output folder holding
training.log, or a TensorBoard folder (scalars loss, learning_rate, samples_per_sec, <name>/accuracy).
"""
import argparse
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main  # noqa: E402

NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
# Searched anywhere in a line, so the prefix ("Training: <time>-" here and in the release, "<time>-rank0-" in this
# repository's older logs) is free.
SPEED_LINE = re.compile(rf"Speed\s+{NUMBER}\s+samples/sec\s+Loss\s+{NUMBER}\s+LearningRate\s+{NUMBER}\s+"
                        rf"Epoch:\s*(\d+)\s+Global Step:\s*(\d+)")
ACCURACY_LINE = re.compile(rf"\[([^\]]+)\]\[(\d+)\]Accuracy-Flip:\s*{NUMBER}\s*\+-\s*{NUMBER}")
SERIES = ("loss", "lr", "speed")  # per-step series of every run; accuracies are per target
TENSORBOARD_TAGS = {"loss": "loss", "lr": "learning_rate", "speed": "samples_per_sec"}
TITLES = {"loss": "loss", "lr": "learning rate", "speed": "samples/s (all ranks)"}


def empty_run(label):
    return {"label": label, **{name: ([], []) for name in SERIES}, "accuracy": {}}


def add(series, step, value):
    series[0].append(step)
    series[1].append(value)


def parse_line(line, run):
    """Add the numbers of one log line to `run`; -> True if the line was a speed or accuracy line."""
    m = SPEED_LINE.search(line)
    if m:
        speed, loss, lr, _epoch, step = m.groups()
        for name, value in (("loss", loss), ("lr", lr), ("speed", speed)):
            add(run[name], int(step), float(value))
        return True
    m = ACCURACY_LINE.search(line)
    if m:
        name, step, accuracy, _std = m.groups()
        add(run["accuracy"].setdefault(name, ([], [])), int(step), float(accuracy))
        return True
    return False


def read_log(path, label=None):
    run = empty_run(label or os.path.basename(os.path.dirname(os.path.abspath(path))))
    with open(path, errors="replace") as f:
        found = sum(parse_line(line, run) for line in f)
    if not found:
        raise ValueError(f"{path}: no 'Speed ... Loss ... Global Step: N' or '[name][step]Accuracy-Flip:' lines")
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


def plot(runs, path):
    """One panel per series (loss, lr, samples/s, then each target's accuracy), every run in each; -> figure."""
    targets = sorted({name for run in runs for name in run["accuracy"]})
    panels = [(TITLES[name], [run[name] for run in runs]) for name in SERIES]
    panels += [(f"{name} accuracy (flip)", [run["accuracy"].get(name, ([], [])) for run in runs])
               for name in targets]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for run, (steps, values) in zip(runs, series):
            marker = "o" if "accuracy" in title or len(steps) < 30 else None
            ax.plot(steps, values, marker=marker, markersize=3, label=run["label"])
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training.log files, output folders or TensorBoard folders")
    parser.add_argument("--labels", nargs="*", default=None, help="legend entries, one per run")
    parser.add_argument("-o", "--output", default="training_curves.png", help="figure path (.png or .pdf)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} given for {len(args.runs)} runs")
    try:
        runs = [read_run(path, args.labels[i] if args.labels else None) for i, path in enumerate(args.runs)]
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    plt.close(plot(runs, args.output))
    for run in runs:
        steps = run["loss"][0]
        span = f"steps {steps[0]}..{steps[-1]}" if steps else "no speed lines"
        print(f"{run['label']}: {span}, verification targets {sorted(run['accuracy']) or 'none'}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
