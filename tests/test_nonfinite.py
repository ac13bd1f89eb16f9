"""utils/nonfinite.py: the device-side counters of NonFiniteMonitor, its one host read, the cross-rank agreement on
the stop flag, and the log lines of a window."""
import pytest
import torch

from utils.nonfinite import NonFiniteMonitor, log_window

NAN = float("nan")


def feed(monitor, losses):
    for loss in losses:
        monitor.record(torch.tensor(loss), torch.tensor(float(loss != loss)))


def test_counters_and_window(monkeypatch):
    monitor = NonFiniteMonitor(torch.device("cpu"), start_step=10, max_nonfinite=2)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    feed(monitor, [1.0, 2.0, NAN, NAN, 3.0])  # global steps 11..15; the run of 2 is complete at step 14
    assert reads == []  # record() never reads on the host
    assert monitor.read(stop_requested=True, distributed=False) == {
        "stop": True, "save": False, "consecutive": 0, "window_bad": 2, "last_bad": 14, "tripped": 14, "window_steps": 5,
        "mean_loss": 2.0, "finite_steps": 3}
    assert reads == ["tolist"]
    feed(monitor, [NAN])  # step 16: a new run of 1; tripped keeps the first step that reached the limit
    assert monitor.read(stop_requested=False, distributed=False) == {
        "stop": False, "save": False, "consecutive": 1, "window_bad": 1, "last_bad": 16, "tripped": 14, "window_steps": 1,
        "mean_loss": None, "finite_steps": 0}
    assert monitor.read(stop_requested=False, distributed=False, save_due=True) == {
        "stop": False, "save": True, "consecutive": 1, "window_bad": 0, "last_bad": 16, "tripped": 14, "window_steps": 0,
        "mean_loss": None, "finite_steps": 0}


def test_limit_not_reached():
    monitor = NonFiniteMonitor(torch.device("cpu"), start_step=0, max_nonfinite=3)
    feed(monitor, [NAN, NAN, 0.5, NAN, NAN, 1.5])
    state = monitor.read(False, False)
    assert (state["tripped"], state["consecutive"], state["window_bad"], state["last_bad"], state["mean_loss"]) == (
        0, 0, 4, 5, 1.0)


def _agree_worker(rank, world_size):
    monitor = NonFiniteMonitor(torch.device("cpu"), start_step=0, max_nonfinite=5)
    feed(monitor, [float(rank + 1)] * 2)
    return monitor.read(stop_requested=(rank == 1), distributed=True, save_due=(rank == 0))


def test_ranks_agree_on_stop_and_save():
    from dist_utils import run_distributed

    states = run_distributed(_agree_worker, 2)
    assert [s["stop"] for s in states] == [True, True]  # rank 1 asked, both stop
    assert [s["save"] for s in states] == [True, True]  # rank 0's clock said a save is due: both save
    assert [s["mean_loss"] for s in states] == [1.0, 2.0]  # the loss stays each rank's own


class RecordingLogger:
    def __init__(self):
        self.records = []

    def warning(self, message):
        self.records.append(("warning", message))

    def error(self, message):
        self.records.append(("error", message))


def messages(state, global_step=7):
    logger = RecordingLogger()
    log_window(state, logger, global_step, 3, "/out")
    return logger.records


@pytest.mark.parametrize("window_bad,tripped,expected", [
    (0, 0, []),
    (2, 0, [("warning", "non-finite loss in 2 of the last 4 step(s), the last at global step 6 (1 in a row now); "
                        "their updates were skipped")]),
    (3, 7, [("warning", "non-finite loss in 3 of the last 4 step(s), the last at global step 6 (1 in a row now); "
                        "their updates were skipped"),
            ("error", "stopping at global step 7: the loss was non-finite for 3 consecutive steps (reached at global "
                      "step 7, last non-finite at global step 6); checkpoints in /out were not overwritten — lower "
                      "lr, use amp=bf16/none or check the data, then resume")]),
])
def test_log_window(window_bad, tripped, expected):
    state = {"window_bad": window_bad, "window_steps": 4, "last_bad": 6, "consecutive": 1, "tripped": tripped}
    assert messages(state) == expected
