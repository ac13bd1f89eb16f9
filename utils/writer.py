"""The rank-0 scalar writer of training: TensorBoard always, Weights & Biases too when config.using_wandb.

Every scalar goes through ScalarWriter.add_scalar, which hands the same (tag, value, step) to both sinks, so the two
cannot diverge.  `wandb` is imported only when enabled; its API key comes from the environment (WANDB_API_KEY) or
`wandb login`, never from a config (utils_config refuses key fields).  See docs/training.md.
"""
import os

from torch.utils.tensorboard import SummaryWriter


class ScalarWriter:
    """add_scalar(tag, value, step) to TensorBoard (<output>/tensorboard) and, if given, a wandb run."""

    def __init__(self, log_dir, wandb_run=None):
        self.tensorboard = SummaryWriter(log_dir=log_dir)
        self.wandb_run = wandb_run

    def add_scalar(self, tag, value, step):
        value = float(value)
        self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def close(self):
        self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb_run(cfg):
    """wandb.init with the config's project/entity/run name and the whole config; run files in <output>/wandb
    unless WANDB_DIR says otherwise (offline runs: WANDB_MODE=offline, then `wandb sync`)."""
    import wandb  # only here: optional (requirement-test.txt); utils_config checked that it is installed

    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name,
                      config=dict(cfg), dir=None if os.environ.get("WANDB_DIR") else cfg.output)


def build_writer(cfg):
    """The writer of rank 0."""
    return ScalarWriter(os.path.join(cfg.output, "tensorboard"), start_wandb_run(cfg) if cfg.using_wandb else None)
