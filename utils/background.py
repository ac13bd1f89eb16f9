"""One job at a time on a background thread, its failure raised on the caller's thread (the checkpoint writer)."""
import threading


class BackgroundJob:
    """run(fn) waits for the previous job, then starts fn() on a thread; wait() blocks until it is done and raises
    its exception here; check() raises it without blocking. With background=False, run() calls fn() in place."""

    def __init__(self, background=True):
        self.background = background
        self.thread = None
        self.error = None

    def _target(self, fn):
        try:
            fn()
        except BaseException as error:  # handed to the training thread by wait()/check()
            self.error = error

    def run(self, fn):
        self.wait()
        if not self.background:
            fn()
            return
        self.thread = threading.Thread(target=self._target, args=(fn,), name="checkpoint-writer")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.check()

    def check(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def busy(self):
        return self.thread is not None and self.thread.is_alive()
