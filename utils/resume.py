"""Resumable training state: saving it as a checkpoint set (utils/checkpoint_set.py), loading it back (also with a
different world size, by re-partitioning the Partial FC shards) and the check that every rank resumes from the same
save.

The per-rank state dict has the keys: epoch, step_in_epoch, global_step, world_size, rank, network,
state_dict_backbone, state_dict_softmax_fc, state_optimizer, state_lr_scheduler, state_scaler ({} without
GradScaler), rng. Earlier versions wrote it whole as checkpoint_gpu_<rank>.pt; those files, and the released
train.py's (six of these keys, read through utils/release_checkpoint.py), still resume when no set is there.
"""
import os
import re
import time

import torch

from partial_fc import merge_shards, shard_for_rank
from utils import checkpoint as ckpt
from utils import checkpoint_policy as policy
from utils import checkpoint_set
from utils import release_checkpoint
from utils.background import BackgroundJob
from utils.distributed import all_gather_tensor


def training_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step):
    """This rank's resumable state (references to the live tensors, nothing copied)."""
    return {
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "world_size": env.world_size, "rank": env.rank, "network": cfg.network,
        "state_dict_backbone": ckpt.unwrap(backbone).state_dict(),
        "state_dict_softmax_fc": head.state_dict(),
        "state_optimizer": optimizer.state_dict(),
        "state_lr_scheduler": scheduler.state_dict(),
        "state_scaler": scaler.state_dict() if scaler is not None else {},
        "rng": ckpt.rng_state(),
    }


def save_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step, job=None,
               logger=None):
    """Write this rank's part of the set of `global_step`: rank 0 the shared state and its own, every other rank its
    own. The tensors are copied to host memory here; the files are written by `job` (a BackgroundJob: off this
    thread, after the previous save is on disk) or right away without one. Rank 0 then removes the sets the policy
    no longer keeps."""
    state = training_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step)
    buffers = [name for name, _ in ckpt.unwrap(backbone).named_buffers()]
    shared, own = checkpoint_set.split_state(state, buffers)
    job = job or BackgroundJob(background=False)
    job.wait()  # one save on disk before the next is copied: at most one host copy at a time
    files = {checkpoint_set.SHARED: shared} if env.rank == 0 else {}
    files[checkpoint_set.rank_file(env.rank)] = own
    files = checkpoint_set.to_host(files)
    folder = checkpoint_set.set_dir(cfg.output, global_step)

    def write():
        checkpoint_set.write_part(folder, env.rank, env.world_size, files)
        if env.rank == 0:
            drop = policy.sets_to_delete(checkpoint_set.scan(cfg.output), cfg.keep_checkpoints, global_step)
            for path in checkpoint_set.remove_sets(cfg.output, drop):
                if logger is not None:
                    logger.info(f"removed checkpoint set {path} (keep_checkpoints={cfg.keep_checkpoints})")

    job.run(write)


class CheckpointSaver:
    """This rank's saves during train(): when (utils/checkpoint_policy.py), written off the training thread, at most
    one per global step. Rank 0 removes the stale sets when it is created, at `start_step` (after the resume, before
    any rank writes): incomplete ones and those of an abandoned run above `start_step`."""

    def __init__(self, cfg, env, logger, modules, start_step, background=True):
        self.cfg, self.env, self.logger, self.modules = cfg, env, logger, modules
        self.job = BackgroundJob(background)
        self.last_step, self.last_time, self.minutes_agreed = None, time.monotonic(), False
        if env.rank == 0:
            for stale in policy.stale_at_start(checkpoint_set.scan(cfg.output), start_step):
                path, = checkpoint_set.remove_sets(cfg.output, [stale])
                logger.info(f"removed {path}: " + ("an incomplete checkpoint set left by a run that was stopped while "
                                                   "writing it" if not policy.is_complete(stale) else
                                                   f"a set above this run's start at step {start_step}, left by an "
                                                   "abandoned run (this run writes those steps again)"))

    def minutes_due(self):
        """This rank's clock: save_every_minutes have passed since the last save (agreed at the sync point)."""
        return policy.minutes_due(time.monotonic() - self.last_time, self.cfg.save_every_minutes)

    def due(self, global_step, synced):
        """A periodic save after this step: every save_every_steps, or the minutes flag agreed at this step's sync
        point (`synced`)."""
        return policy.steps_due(global_step, self.cfg.save_every_steps) or (synced and self.minutes_agreed)

    def save(self, epoch, step_in_epoch, global_step):
        if global_step != self.last_step:
            save_state(self.cfg, self.env, *self.modules, epoch, step_in_epoch, global_step, job=self.job,
                       logger=self.logger)
        self.last_step, self.last_time = global_step, time.monotonic()

    def check(self):
        """Raise here the error of a failed background write (a full disk, ...)."""
        self.job.check()

    def close(self):
        """Wait until the last save is on disk (raising its error, if any)."""
        self.job.wait()


def load_states(saved, backbone, head, optimizer, scheduler, scaler):
    """Put a checkpoint's module, optimiser, schedule and scaler states back (the inverse of save_state)."""
    backbone.load_state_dict(saved["state_dict_backbone"])
    head.load_state_dict(saved["state_dict_softmax_fc"])
    ckpt.load_optimizer_state(optimizer, saved["state_optimizer"])  # keeps our fused/foreach/... flags
    scheduler.load_state_dict(saved["state_lr_scheduler"])
    if scaler is not None and saved["state_scaler"]:
        scaler.load_state_dict(saved["state_scaler"])


def resume_training(cfg, env, logger, steps_per_epoch, backbone, head, optimizer, scheduler, scaler):
    """Load this rank's checkpoint into the modules. -> (start epoch, optimiser step inside it, global step, RNG
    state to restore or None); (0, 0, 0, None) when there is nothing to resume."""
    saved = load_resume(cfg, env, logger)
    if saved is None:
        return 0, 0, 0, None
    load_states(saved, backbone, head, optimizer, scheduler, scaler)
    rng = saved["rng"] if saved["world_size"] == env.world_size else None  # the RNG streams are per rank
    epoch, in_epoch, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
    if in_epoch >= steps_per_epoch:
        epoch, in_epoch = epoch + 1, 0
    logger.info(f"resumed at epoch {epoch}, step {in_epoch} of the epoch, global step {global_step}")
    return epoch, in_epoch, global_step, rng


def load_resume(cfg, env, logger):
    """This rank's state from cfg.output, or None when there is none: the newest complete checkpoint set, else the
    single-file checkpoint_gpu_<rank>.pt (earlier versions, the release; checkpoint_gpu_0.pt re-partitioned for a
    rank that has no file). Every rank must agree on the save (check_resume_agreement)."""
    saved, used, error = None, None, None
    try:
        chosen, skipped = policy.newest_complete(checkpoint_set.scan(cfg.output))
        for info in skipped:
            missing = policy.missing_ranks(info)
            logger.warning(f"skipping {checkpoint_set.set_dir(cfg.output, info.step)}: incomplete, "
                           + (f"rank(s) {missing} did not finish writing it" if missing else "no rank finished it")
                           + " (the run stopped during that save); resuming from the newest set every rank saved")
        if chosen is not None:
            saved, used = load_set(cfg, env, logger, chosen)
        else:
            saved, used = load_single_files(cfg, env, logger)
    except Exception as e:  # every rank still joins the agreement below, so the others fail too instead of hanging
        error = e
    if env.distributed:
        check_resume_agreement(cfg, env, saved, used, error)
    if error is not None:
        raise error
    return saved


def load_set(cfg, env, logger, info):
    """This rank's state from the complete set `info`. -> (state, path of the rank file used)."""
    folder = checkpoint_set.set_dir(cfg.output, info.step)
    old_world = policy.world_size(info)
    logger.info(f"resuming from {folder}: global step {info.step}, the newest set all {old_world} rank(s) saved")
    shared = checkpoint_set.read_shared(folder)
    used = os.path.join(folder, checkpoint_set.rank_file(env.rank if env.rank < old_world else 0))
    saved = checkpoint_set.read_rank_state(folder, env.rank if env.rank < old_world else 0, shared)
    if old_world != env.world_size:
        logger.info(f"checkpoint written by {old_world} ranks, running on {env.world_size}: re-partitioning the "
                    "Partial FC shards")
        paths = [os.path.join(folder, checkpoint_set.rank_file(r)) for r in range(old_world)]
        saved = repartition_states(cfg, env, saved, paths,
                                   lambda path: checkpoint_set.merge_state(shared, ckpt.load(path)))
    return saved, used


def load_single_files(cfg, env, logger):
    """This rank's checkpoint_gpu_<rank>.pt (else checkpoint_gpu_0.pt re-partitioned). -> (state, path) or
    (None, None) when there is none."""
    own = ckpt.checkpoint_path(cfg.output, env.rank)
    first = ckpt.checkpoint_path(cfg.output, 0)
    if not os.path.exists(first):
        logger.warning(f"resume=True but {first} does not exist and {cfg.output} holds no complete checkpoint set; "
                       "starting from scratch")
        return None, None
    used = own if os.path.exists(own) else first
    saved = release_checkpoint.load(used)
    if saved.get("from_release"):
        logger.info(release_checkpoint.resume_note(saved))
    if saved["world_size"] != env.world_size:
        logger.info(f"checkpoint written by {saved['world_size']} ranks, running on {env.world_size}: "
                    "re-partitioning the Partial FC shards")
        saved = repartition_states(cfg, env, saved)
    return saved, used


def repartition_states(cfg, env, saved, paths=None, read=release_checkpoint.load):
    """Resume from `saved` (this rank's checkpoint) when it was written by a different world size: merge the Partial
    FC shards (and their optimiser state) of all old ranks (`paths`, read by `read`; default: the single files
    checkpoint_gpu_<rank>.pt) and cut this rank's shard."""
    old_world = saved["world_size"]
    paths = paths or [ckpt.checkpoint_path(cfg.output, r) for r in range(old_world)]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"cannot re-partition the Partial FC shards for {env.world_size} rank(s): {path} is missing. The "
                f"previous run used {old_world} ranks and all of its checkpoint files (checkpoint_gpu_0.pt .. "
                f"checkpoint_gpu_{old_world - 1}.pt) are needed in the output folder {cfg.output}; copy them there, "
                f"or resume with {old_world} ranks")
    states = [read(path) for path in paths]
    for path, state in zip(paths, states):
        if state.get("world_size") != old_world or state.get("global_step") != saved.get("global_step"):
            raise RuntimeError(
                f"cannot re-partition the Partial FC shards: {path} was written by a run of "
                f"{state.get('world_size')} rank(s) at global step {state.get('global_step')}, but this resume needs "
                f"the checkpoints of {old_world} rank(s) at global step {saved.get('global_step')}; the "
                f"checkpoint_gpu_*.pt files in {cfg.output} must all come from the same save of the previous run")
    merged = merge_shards([s["state_dict_softmax_fc"]["weight"] for s in states])
    # the other head entries (AdaFace's running norm statistics) are the same on every rank: kept as they are
    saved["state_dict_softmax_fc"]["weight"] = shard_for_rank(merged, env.rank, env.world_size)
    opt = saved["state_optimizer"]
    head_index = opt["param_groups"][-1]["params"][0]  # the head is the last group (train.build_optimizer)
    head_rows = states[0]["state_dict_softmax_fc"]["weight"].shape[0]
    head_state = {}
    for key, value in opt["state"].get(head_index, {}).items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == head_rows:  # a per-centre state
            full = merge_shards([s["state_optimizer"]["state"][head_index][key] for s in states])
            value = shard_for_rank(full, env.rank, env.world_size)
        head_state[key] = value
    if head_state:
        opt["state"][head_index] = head_state
    # the same samples were seen: convert the position inside the epoch to the new global batch
    seen = saved["step_in_epoch"] * cfg.gradient_acc * cfg.batch_size * old_world
    saved["step_in_epoch"] = seen // (cfg.gradient_acc * cfg.batch_size * env.world_size)
    return saved


def check_resume_agreement(cfg, env, saved, used, error):
    """Every rank must resume from the same save: gather (global step, file index) of all ranks and raise a clear
    error when they differ, e.g. a stale checkpoint_gpu_1.pt of an earlier 2-rank run next to the checkpoint_gpu_0.pt
    of a later 1-rank run (rank 1 would silently resume from an older step)."""
    step = -2 if error is not None else (-1 if saved is None else int(saved["global_step"]))
    index = -1 if used is None else int(re.search(r"([0-9]+)\.pt$", used).group(1))
    in_set = int(used is not None and os.path.basename(used).startswith("rank_"))
    rows = all_gather_tensor(torch.tensor([step, index, in_set], dtype=torch.int64, device=env.device))
    rows = [tuple(int(v) for v in row.tolist()) for row in rows]
    if error is not None:
        return  # this rank raises its own error
    if any(s == -2 for s, _, _ in rows):
        bad = [r for r, (s, _, _) in enumerate(rows) if s == -2]
        raise RuntimeError(f"resume failed on rank(s) {bad} (see their error); rank {env.rank} stops too")
    if len({s for s, _, _ in rows}) > 1:
        def name(s, i, in_set):
            return os.path.join(checkpoint_set.set_dir("", s), f"rank_{i}.pt") if in_set else f"checkpoint_gpu_{i}.pt"
        desc = ", ".join(f"rank {r}: " + (f"{name(s, i, k)} at global step {s}" if s >= 0 else "no checkpoint")
                         for r, (s, i, k) in enumerate(rows))
        raise RuntimeError(
            f"cannot resume: the ranks would continue from different checkpoints ({desc}) in {cfg.output}. The "
            "checkpoint_gpu_*.pt files there come from different saves, e.g. a stale file left by an earlier run "
            "with more ranks; keep only the files of the latest save (delete the older ones: a resume with a "
            "different world size re-partitions the Partial FC shards from checkpoint_gpu_0.pt .. of that save)")
