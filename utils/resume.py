"""Resumable training state: the per-rank checkpoint_gpu_<rank>.pt, loading it back (also with a different world
size, by re-partitioning the Partial FC shards) and the check that every rank resumes from the same save.

Checkpoint keys: epoch, step_in_epoch, global_step, world_size, rank, network, state_dict_backbone,
state_dict_softmax_fc, state_optimizer, state_lr_scheduler, state_scaler ({} without GradScaler), rng.
Checkpoints written by the released train.py (six of these keys) are read through utils/release_checkpoint.py.
"""
import os

import torch

from partial_fc import merge_shards, shard_for_rank
from utils import checkpoint as ckpt
from utils import release_checkpoint
from utils.distributed import all_gather_tensor


def save_state(cfg, env, backbone, head, optimizer, scheduler, scaler, epoch, step_in_epoch, global_step):
    """Per-rank resumable checkpoint (atomic)."""
    ckpt.atomic_save({
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
        "world_size": env.world_size, "rank": env.rank, "network": cfg.network,
        "state_dict_backbone": ckpt.unwrap(backbone).state_dict(),
        "state_dict_softmax_fc": head.state_dict(),
        "state_optimizer": optimizer.state_dict(),
        "state_lr_scheduler": scheduler.state_dict(),
        "state_scaler": scaler.state_dict() if scaler is not None else {},
        "rng": ckpt.rng_state(),
    }, ckpt.checkpoint_path(cfg.output, env.rank))


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
    """This rank's checkpoint in cfg.output (its own file, else checkpoint_gpu_0.pt re-partitioned), or None when
    there is none; every rank must agree on the save (check_resume_agreement)."""
    own = ckpt.checkpoint_path(cfg.output, env.rank)
    first = ckpt.checkpoint_path(cfg.output, 0)
    saved, used, error = None, None, None
    try:
        if not os.path.exists(first):
            logger.warning(f"resume=True but {first} does not exist; starting from scratch")
        else:
            used = own if os.path.exists(own) else first
            saved = release_checkpoint.load(used)
            if saved.get("from_release"):
                logger.info(release_checkpoint.resume_note(saved))
            if saved["world_size"] != env.world_size:
                logger.info(f"checkpoint written by {saved['world_size']} ranks, running on {env.world_size}: "
                            "re-partitioning the Partial FC shards")
                saved = repartition_states(cfg, env, saved)
    except Exception as e:  # every rank still joins the agreement below, so the others fail too instead of hanging
        error = e
    if env.distributed:
        check_resume_agreement(cfg, env, saved, used, error)
    if error is not None:
        raise error
    return saved


def repartition_states(cfg, env, saved):
    """Resume from `saved` (this rank's checkpoint) when it was written by a different world size: merge the Partial
    FC shards (and their optimiser state) of all old ranks and cut this rank's shard."""
    old_world = saved["world_size"]
    paths = [ckpt.checkpoint_path(cfg.output, r) for r in range(old_world)]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"cannot re-partition the Partial FC shards for {env.world_size} rank(s): {path} is missing. The "
                f"previous run used {old_world} ranks and all of its checkpoint files (checkpoint_gpu_0.pt .. "
                f"checkpoint_gpu_{old_world - 1}.pt) are needed in the output folder {cfg.output}; copy them there, "
                f"or resume with {old_world} ranks")
    states = [release_checkpoint.load(path) for path in paths]
    for path, state in zip(paths, states):
        if state.get("world_size") != old_world or state.get("global_step") != saved.get("global_step"):
            raise RuntimeError(
                f"cannot re-partition the Partial FC shards: {path} was written by a run of "
                f"{state.get('world_size')} rank(s) at global step {state.get('global_step')}, but this resume needs "
                f"the checkpoints of {old_world} rank(s) at global step {saved.get('global_step')}; the "
                f"checkpoint_gpu_*.pt files in {cfg.output} must all come from the same save of the previous run")
    merged = merge_shards([s["state_dict_softmax_fc"]["weight"] for s in states])
    saved["state_dict_softmax_fc"] = {"weight": shard_for_rank(merged, env.rank, env.world_size)}
    opt = saved["state_optimizer"]
    head_index = opt["param_groups"][1]["params"][0]
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
    index = -1 if used is None else int(os.path.basename(used)[len("checkpoint_gpu_"):-len(".pt")])
    rows = all_gather_tensor(torch.tensor([step, index], dtype=torch.int64, device=env.device))
    rows = [tuple(int(v) for v in row.tolist()) for row in rows]
    if error is not None:
        return  # this rank raises its own error
    if any(s == -2 for s, _ in rows):
        bad = [r for r, (s, _) in enumerate(rows) if s == -2]
        raise RuntimeError(f"resume failed on rank(s) {bad} (see their error); rank {env.rank} stops too")
    steps = {s for s, _ in rows}
    if len(steps) > 1:
        desc = ", ".join(f"rank {r}: " + (f"checkpoint_gpu_{i}.pt at global step {s}" if s >= 0 else "no checkpoint")
                         for r, (s, i) in enumerate(rows))
        raise RuntimeError(
            f"cannot resume: the ranks would continue from different checkpoints ({desc}) in {cfg.output}. The "
            "checkpoint_gpu_*.pt files there come from different saves, e.g. a stale file left by an earlier run "
            "with more ranks; keep only the files of the latest save (delete the older ones: a resume with a "
            "different world size re-partitions the Partial FC shards from checkpoint_gpu_0.pt .. of that save)")
