"""tools/plot_training.py: exact numbers from each log layout and from TensorBoard, and what the figure shows."""
import math

import numpy as np
import pytest

from tools import plot_training as pt
from utils.utils_callbacks import CallBackLogging
from utils.utils_logging import AverageMeter, init_logging

RELEASE = [  # the released TransFace / arcface_torch layout (formatter "Training: %(asctime)s-%(message)s")
    "Training: 2023-03-17 10:11:12,345-Speed 1234.56 samples/sec   Loss 12.3456   LearningRate 0.000100   "
    "Epoch: 0   Global Step: 20   Fp16 Grad Scale: 65536   Required: 123 hours",
    "Training: 2023-03-17 10:11:12,345-[lfw][2000]XNorm: 22.100000",
    "Training: 2023-03-17 10:11:12,345-[lfw][2000]Accuracy-Flip: 0.99500+-0.00300",
    "Training: 2023-03-17 10:11:12,345-[lfw][2000]Accuracy-Highest: 0.99500",
]
OURS = [  # this repository's older layout ("%(asctime)s-rank0-%(message)s", no grad scale without fp16)
    "2026-11-02 08:00:01,002-rank0-Speed 812.34 samples/sec   Loss 45.6789   LearningRate 0.000950   Epoch: 3   "
    "Global Step: 250   Required: 0.2 hours",
    "2026-11-02 08:00:01,002-rank0-Speed 900.00 samples/sec   Loss nan   LearningRate 1.5e-05   Epoch: 3   "
    "Global Step: 260   Fp16 Grad Scale: 1024   Required: 0.1 hours",
    "2026-11-02 08:00:09,500-rank0-[cfp_fp][250]Accuracy-Flip: 0.87143+-0.01234",
    "2026-11-02 08:00:09,500-rank0-config:",  # not a measurement
]


def parse(lines):
    run = pt.empty_run("r")
    return run, [pt.parse_line(line, run) for line in lines]


def test_release_layout():
    run, hits = parse(RELEASE)
    assert hits == [True, False, True, False]
    assert run["speed"] == ([20], [1234.56]) and run["loss"] == ([20], [12.3456]) and run["lr"] == ([20], [0.0001])
    assert run["accuracy"] == {"lfw": ([2000], [0.995])}


def test_our_layout():
    run, hits = parse(OURS)
    assert hits == [True, True, True, False]
    assert run["speed"] == ([250, 260], [812.34, 900.0])
    assert run["lr"] == ([250, 260], [0.00095, 1.5e-05])
    assert run["loss"][1][0] == 45.6789 and math.isnan(run["loss"][1][1])
    assert run["accuracy"] == {"cfp_fp": ([250], [0.87143])}


def test_the_training_callback_output_parses(tmp_path):
    """Whatever layout utils/utils_callbacks.py writes, the plotter reads its numbers back."""
    logger = init_logging(0, str(tmp_path), name="plot_training_test")
    callback = CallBackLogging(frequent=10, total_step=100, batch_size=32, world_size=2, logger=logger)
    meter = AverageMeter()
    callback(10, meter, 0, 0.01)  # first call only starts the clock
    meter.update(3.14159)
    callback(20, meter, 1, 0.000123, grad_scale=512.0)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    run = pt.read_run(str(tmp_path))
    assert run["loss"] == ([20], [3.1416]) and run["lr"] == ([20], [0.000123])
    assert run["speed"][0] == [20] and run["speed"][1][0] > 0
    assert run["scale"] == ([20], [512.0])
    assert run["label"] == tmp_path.name


def test_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step, loss in ((10, 40.0), (20, 30.5)):
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("learning_rate", 0.001 * step, step)
        writer.add_scalar("samples_per_sec", 100.0 + step, step)
        writer.add_scalar("grad_scale", 2.0 ** (16 + step // 10), step)  # utils/utils_callbacks.py's tag under fp16
    writer.add_scalar("lfw/accuracy", 0.75, 20)
    writer.add_scalar("lfw/xnorm", 20.0, 20)
    writer.close()
    run = pt.read_run(str(tmp_path / "tensorboard"))
    assert run["label"] == tmp_path.name  # <output>/tensorboard is named after <output>
    assert run["loss"] == ([10, 20], [40.0, 30.5])
    np.testing.assert_allclose(run["lr"][1], [0.01, 0.02], rtol=1e-7)  # float32 in the event file
    assert run["speed"] == ([10, 20], [110.0, 120.0]) and run["accuracy"] == {"lfw": ([20], [0.75])}
    assert run["scale"] == ([10, 20], [2.0 ** 17, 2.0 ** 18])


def test_figure_overlays_runs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "training.log").write_text("\n".join(RELEASE) + "\n")
    (tmp_path / "b.log").write_text("\n".join(OURS) + "\n")
    out = tmp_path / "curves.png"
    pt.main([str(tmp_path / "a"), str(tmp_path / "b.log"), "--labels", "release", "ours", "-o", str(out)])
    assert out.stat().st_size > 0
    fig = pt.plot([pt.read_run(str(tmp_path / "a"), "release"), pt.read_run(str(tmp_path / "b.log"), "ours")],
                  str(tmp_path / "again.png"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:6] == ["loss", "learning rate", "samples/s (all ranks)", "fp16 grad scale",
                          "cfp_fp accuracy (flip)", "lfw accuracy (flip)"]
    lr_lines = fig.axes[1].get_lines()
    assert [line.get_label() for line in lr_lines] == ["release", "ours"]
    assert list(lr_lines[1].get_xdata()) == [250, 260] and list(lr_lines[1].get_ydata()) == [0.00095, 1.5e-05]
    scale = fig.axes[3].get_lines()
    assert list(scale[0].get_ydata()) == [65536] and list(scale[1].get_ydata()) == [1024]
    lfw = fig.axes[5].get_lines()
    assert list(lfw[0].get_ydata()) == [0.995] and len(lfw[1].get_xdata()) == 0  # "ours" has no lfw


def test_unparsable_log_is_one_clear_error(tmp_path):
    path = tmp_path / "training.log"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="training.log: no 'Speed"):
        pt.read_run(str(path))


# What `python tools/plot_training.py --release all` prints for the release's logs (docs/training.md quotes it).
RELEASE_SUMMARIES = {
    "vit_s": "TransFace-S (release, MS1MV2): steps 20..49730 of 49735; loss 73.50 at step 20 (start), 14.49 at step "
             "4260 (warm-up end: 4263), 5.82 at step 14210 (after 10 epochs), 0.78 at step 49730 (end); LR peak "
             "0.001 at step 4270; fp16 grad scale 2^16..2^20, 2^17 on 91 % of the lines, 191 drops (one per 260 "
             "steps)",
    "vit_b": "TransFace-B (release, MS1MV2): steps 20..49730 of 49735; loss 75.24 at step 20 (start), 16.56 at step "
             "4260 (warm-up end: 4263), 6.12 at step 14210 (after 10 epochs), 0.71 at step 49730 (end); LR peak "
             "0.001 at step 4270; fp16 grad scale 2^16..2^19, 2^17 on 84 % of the lines, 250 drops (one per 199 "
             "steps)",
    "vit_l": "TransFace-L (release, MS1MV2): steps 20..49730 of 49735; loss 74.98 at step 20 (start), 15.02 at step "
             "4260 (warm-up end: 4263), 4.81 at step 14210 (after 10 epochs), 0.28 at step 49730 (end); LR peak "
             "0.001 at step 4270; fp16 grad scale 2^16..2^20, 2^17 on 59 % of the lines, 279 drops (one per 178 "
             "steps)",
}


def test_release_logs():
    run = pt.read_release("vit_s")
    assert run["total_step"] == 49735 and run["warmup_step"] == 4263
    steps, losses = run["loss"]
    assert len(steps) == 4972 and steps[:2] == [20, 30] and steps[-1] == 49730 and set(np.diff(steps)) == {10}
    assert losses[:2] == [73.5045, 73.0466] and losses[-1] == 0.7836
    assert run["lr"][1][:2] == [4e-06, 7e-06] and run["epoch"][1][-1] == 34 and run["scale"][1][0] == 65536
    assert run["speed"] == ([], [])  # 8 GPUs of the authors' machine: not a figure to compare with
    # The release's schedule is this repository's PolyScheduler: its log shows lr(step - 1) with 6 decimals.
    import torch

    from lr_scheduler import PolyScheduler

    schedule = PolyScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), 1e-3, 49735, 4263)
    assert max(abs(lr - schedule.lr_at(step - 1)) for step, lr in zip(*run["lr"])) <= 5e-7 + 1e-12


@pytest.mark.parametrize("name", ["vit_s", "vit_b", "vit_l"])
def test_release_summary(name):
    assert pt.summary(pt.read_release(name)) == RELEASE_SUMMARIES[name]


def test_summary_and_fraction_axis_of_a_run_over_the_release(tmp_path):
    """A run's config dump gives its total and warm-up steps; with --release every x is step / total_step."""
    lines = ["Training: 2026-12-06 10:00:00,000-: warmup_step              62",
             "Training: 2026-12-06 10:00:00,000-: total_step               434"]
    for step in range(10, 440, 10):
        lines.append(f"Training: 2026-12-06 10:00:01,000-Speed 150.00 samples/sec   Loss {80 - step / 10:.4f}   "
                     f"LearningRate {min(step / 62, 1) * 1e-3:.6f}   Epoch: {step // 62}   Global Step: {step}   "
                     "Required: 0 hours")
    lines.append("Training: 2026-12-06 10:00:09,000-[lfw][434]Accuracy-Flip: 0.95833+-0.01000")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "training.log").write_text("\n".join(lines) + "\n")
    run = pt.read_run(str(tmp_path / "demo"))
    assert run["total_step"] == 434 and run["warmup_step"] == 62 and run["scale"] == ([], [])
    assert pt.summary(run) == ("demo: steps 10..430 of 434; loss 79.00 at step 10 (start), 74.00 at step 60 "
                               "(warm-up end: 62), 37.00 at step 430 (end); LR peak 0.001 at step 70")
    fig = pt.plot([run, pt.read_release("vit_b")], str(tmp_path / "c.png"), fraction=True)
    loss = fig.axes[0]
    assert loss.get_xlabel().startswith("fraction of training") and loss.get_yscale() == "log"
    ours, release = loss.get_lines()
    assert list(ours.get_xdata()) == [step / 434 for step in range(10, 440, 10)]
    assert release.get_xdata()[0] == 20 / 49735 and release.get_xdata()[-1] == 49730 / 49735
    lfw = next(ax for ax in fig.axes if ax.get_title() == "lfw accuracy (flip)")
    assert list(lfw.get_lines()[0].get_xdata()) == [1.0]  # lfw after the last step


def test_release_alone_and_usage(tmp_path, capsys):
    pt.main(["--release", "all", "-o", str(tmp_path / "r.png")])
    out = capsys.readouterr().out.splitlines()
    assert out == [RELEASE_SUMMARIES[name] for name in ("vit_s", "vit_b", "vit_l")] + [f"wrote {tmp_path / 'r.png'}"]
    with pytest.raises(SystemExit) as exit_info:
        pt.main(["-o", str(tmp_path / "r.png")])
    assert exit_info.value.code == 2
