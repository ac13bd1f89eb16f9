"""Logger for training: rank 0 writes to stdout and `<output>/training.log`; other ranks only log warnings.

Line layouts are the release's (and arcface_torch's), so scripts that parse their training.log read ours:
every rank-0 line starts with "Training: <asctime>-", the config dump is one ": <key padded to 25> <value>" line
per field.
"""
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
    # rank 0: the release's layout; other ranks (warnings only, stdout) also name their rank
    formatter = logging.Formatter("Training: %(asctime)s-%(message)s" if rank == 0 else
                                  f"Training: %(asctime)s-rank{rank}-%(message)s")
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


def config_lines(cfg, derived):
    """The release's config dump: its fields in config order, then the derived `derived` items (total_batch_size,
    warmup_step, total_step), one ": " + key + spaces to column 25 + str(value) line each."""
    return [": " + key + " " * (25 - len(key)) + str(value) for key, value in [*cfg.items(), *derived.items()]]


def log_config(logger, cfg, world_size, warmup_step, total_step):
    """Log the config dump with the schedule the release derives from it (total_batch_size counts gradient_acc,
    equal to the release's batch_size * world_size at its gradient_acc of 1)."""
    derived = {"total_batch_size": cfg.batch_size * world_size * cfg.gradient_acc, "warmup_step": warmup_step,
               "total_step": total_step}
    for line in config_lines(cfg, derived):
        logger.info(line)
