"""Stop requests for train(stop=...): SIGTERM/SIGINT only set a host flag, acted on between optimiser steps
(docs/training_loop.md: a world of one saves after the current step, several ranks agree at the next sync point)."""
import signal


class StopRequest:
    """Callable `stop(global_step) -> bool` for train(); install() makes SIGTERM and SIGINT request the stop."""

    def __init__(self):
        self.signum = None
        self.global_step = None  # the last step polled (the last finished optimiser step), for failure messages

    def install(self, signals=(signal.SIGTERM, signal.SIGINT)):
        for sig in signals:
            signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum  # nothing else may run inside a signal handler between two kernels

    def __call__(self, global_step):
        self.global_step = global_step
        return self.signum is not None

    def reason(self):
        """Why this rank stopped, for the message after train() returned "preempted"."""
        if self.signum is not None:
            return f"interrupted by signal {self.signum}"
        # this rank got no signal: the cross-rank stop flag was raised by another rank
        return "stopped because another rank requested a stop (it received SIGTERM/SIGINT)"
