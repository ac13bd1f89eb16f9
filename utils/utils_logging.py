"""Logger for training: rank 0 writes to stdout and `<output>/training.log`; other ranks only log warnings."""
import logging
import os
import sys


class AverageMeter:
    """Running mean of a value since the last reset()."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += value * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def init_logging(rank, output, name="transface"):
    """Return the training logger (handlers replaced, so calling it twice in one process is safe)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    formatter = logging.Formatter(f"%(asctime)s-rank{rank}-%(message)s")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output, "training.log"))
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    return logger
