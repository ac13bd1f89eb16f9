"""Resume from the per-rank checkpoints the released TransFace train.py writes (docs/migrating.md).

The release saves `checkpoint_gpu_{rank}.pt` at the end of an epoch as a dict of exactly six keys: epoch (completed
epochs), global_step, state_dict_backbone, state_dict_softmax_fc ({"weight": this rank's shard}), state_optimizer
(torch's AdamW/SGD state_dict, two param groups: backbone, head) and state_lr_scheduler (its PolyScheduler's
state_dict). It records neither its world size, nor a GradScaler, nor RNG states, nor a position inside the epoch.
from_release() turns such a dict into this repository's layout; the missing state starts fresh.
"""
import os

from utils import checkpoint as ckpt

RELEASE_KEYS = frozenset({"epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer",
                          "state_lr_scheduler"})
# Keys of our PolyScheduler.state_dict() that the release's scheduler state also carries (same meaning).
SCHEDULER_KEYS = ("base_lr", "max_steps", "warmup_steps", "power", "base_lrs", "last_epoch", "_step_count",
                  "_get_lr_called_within_step", "_last_lr")


def is_release_checkpoint(saved):
    return isinstance(saved, dict) and set(saved) == RELEASE_KEYS


def release_world_size(output):
    """The release does not record its world size: it is the number of checkpoint_gpu_0.pt, _1.pt, ... files in
    `output` (one per rank of the run that wrote them)."""
    world = 0
    while os.path.exists(ckpt.checkpoint_path(output, world)):
        world += 1
    return world


def scheduler_state_from_release(state):
    """The release's PolyScheduler state_dict -> ours.

    Same schedule values lr(e); the keys the release adds are dropped: warmup_lr_init (never used by its schedule)
    and verbose (a torch argument since removed). The counter `last_epoch` is kept as saved. The release steps its
    scheduler once per iteration like ours but starts one count behind (its constructor resets the counter after
    setting lr(0)), so after G iterations it holds last_epoch = G - 1 and its iteration G + 1 trains with lr(G - 1).
    Keeping the counter continues exactly that sequence: every remaining iteration of the resumed run uses the LR
    the release would have used, and the run ends where the release's would (no jump by one schedule step)."""
    missing = [key for key in SCHEDULER_KEYS if key not in state]
    if missing:
        raise ValueError(f"state_lr_scheduler of a released checkpoint lacks {missing}; expected the release's "
                         f"PolyScheduler state_dict")
    converted = {key: state[key] for key in SCHEDULER_KEYS}
    converted["_is_initial"] = False
    return converted


def from_release(saved, world_size):
    """A released checkpoint dict (written by a run of `world_size` ranks) -> this repository's layout: position at
    the start of epoch `epoch`, no GradScaler state (a new scaler starts at its initial scale), no RNG state (the
    run's seeds apply)."""
    return {
        "epoch": int(saved["epoch"]), "step_in_epoch": 0, "global_step": int(saved["global_step"]),
        "world_size": world_size, "network": None, "from_release": True,
        "state_dict_backbone": saved["state_dict_backbone"],
        "state_dict_softmax_fc": saved["state_dict_softmax_fc"],
        "state_optimizer": saved["state_optimizer"],
        "state_lr_scheduler": scheduler_state_from_release(saved["state_lr_scheduler"]),
        "state_scaler": {},
        "rng": None,
    }


def load(path):
    """ckpt.load(path); a checkpoint of the released train.py comes back converted by from_release()."""
    saved = ckpt.load(path)
    if is_release_checkpoint(saved):
        return from_release(saved, release_world_size(os.path.dirname(os.fspath(path))))
    if not isinstance(saved, dict) or "world_size" not in saved:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ckpt.CheckpointError(
            f"{path}: not a training checkpoint: expected this project's keys (world_size, epoch, ...) or the "
            f"released train.py's {sorted(RELEASE_KEYS)}, found {found}")
    return saved


def resume_note(saved):
    """The log line for a resume from a released checkpoint."""
    return (f"resuming a checkpoint written by the released TransFace train.py ({saved['world_size']} rank(s)): "
            f"epoch {saved['epoch']}, global step {saved['global_step']}; backbone, Partial FC shard, optimiser and "
            "LR schedule restored. The release saved no GradScaler, RNG state or position inside an epoch: the "
            "GradScaler starts fresh, the RNGs keep this run's seed and the epoch starts from its first batch")
