"""utils/stop.py: a signal only latches the stop flag that train() polls; the reason names the signal or the rank
that asked."""
import os
import signal

from utils.stop import StopRequest


def test_signal_latches_the_flag():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopRequest().install(signals=(signal.SIGUSR1,))
        assert signal.getsignal(signal.SIGUSR1) == stop.handle
        assert stop(5) is False and stop.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill() returns
        assert stop(6) is True and stop(7) is True
        assert stop.reason() == f"interrupted by signal {int(signal.SIGUSR1)}"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_default_signals_and_reason_without_signal():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopRequest().install()
        assert all(signal.getsignal(sig) == stop.handle for sig in saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert stop.reason() == "stopped because another rank requested a stop (it received SIGTERM/SIGINT)"
    stop.handle(signal.SIGTERM, None)
    assert stop(0) is True and stop.reason() == f"interrupted by signal {int(signal.SIGTERM)}"
