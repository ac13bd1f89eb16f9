"""Process-group setup for every way train.py is launched.

- torchrun (single or multi node): LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the environment.
- `python -m torch.distributed.launch`: passes --local-rank=N (or --local_rank with old torch) and sets the same env.
- `srun python train.py ...` (SLURM, one task per GPU): no torchrun variables; SLURM's SLURM_PROCID, SLURM_NTASKS and
  SLURM_LOCALID give the ranks, and the rendezvous is MASTER_ADDR/MASTER_PORT when exported, else the step's first
  node and a port derived from the job id (docs/cluster.md).
- plain `python train.py ...`: no env at all -> a world of one. No process group is created then (Partial FC and the
  loop run without collectives), so no port is ever needed.
The backend is nccl when CUDA is available, gloo otherwise. Every collective fails after `timeout_minutes` instead
of blocking forever when a peer hangs or dies (config.dist_timeout_minutes).
"""
import os
import re
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self):
        return self.world_size > 1


def launch_ranks(environ, local_rank_arg=None):
    """(rank, world_size, local_rank) of this process from the launcher's variables: torchrun's (RANK, WORLD_SIZE,
    LOCAL_RANK, or --local-rank from torch.distributed.launch), else those of a task started by srun (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID; SLURM_STEP_ID tells an srun task from the batch script, which has SLURM_PROCID=0 and
    the job's SLURM_NTASKS too), else a world of one."""
    local_default = local_rank_arg if local_rank_arg is not None else 0
    if "WORLD_SIZE" in environ:
        return (int(environ.get("RANK", 0)), int(environ["WORLD_SIZE"]),
                int(environ.get("LOCAL_RANK", local_default)))
    if "SLURM_STEP_ID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ["SLURM_LOCALID"])
    return 0, 1, local_default


def first_hostname(nodelist):
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07" (what `scontrol show hostnames | head -n1`
    prints)."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+)[^\]]*\]([^,]*))?", nodelist)
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, first, suffix = match.groups()
    return prefix + (first or "") + (suffix or "")


def init_method(environ):
    """The process group's rendezvous: "env://" when the launcher exported MASTER_ADDR (torchrun always does), else
    for an srun task tcp://<first node of the step>:<20000 + SLURM_JOB_ID % 10000>, the same on every task."""
    if "MASTER_ADDR" in environ:
        return "env://"
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if nodelist is None or "SLURM_JOB_ID" not in environ:
        raise RuntimeError("several processes but no MASTER_ADDR (torchrun sets it; under srun export MASTER_ADDR and "
                           "MASTER_PORT, or keep SLURM_JOB_NODELIST and SLURM_JOB_ID)")
    port = environ.get("MASTER_PORT") or 20000 + int(environ["SLURM_JOB_ID"]) % 10000
    return f"tcp://{first_hostname(nodelist)}:{port}"


def setup_distributed(local_rank_arg=None, timeout_minutes=10.0):
    """Initialise the process group if the launcher asked for one; return the DistEnv of this process."""
    rank, world_size, local_rank = launch_ranks(os.environ, local_rank_arg)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        store, _, _ = next(dist.rendezvous(init_method(os.environ), rank, world_size, timeout=timeout))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            # torchrun's restarts reuse its store: without a prefix per attempt, a restarted rank can read the
            # addresses the killed group published there and fail to connect (or wait on a stale NCCL id)
            store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank, local_rank, world_size, device)


def wrap_ddp(module, env):
    """`module` in DDP when there are several ranks, else `module` itself. find_unused_parameters=False (the release
    searched for unused ViT parameters every step, an extra pass over the autograd graph): every trainable parameter
    of every released layout gets a gradient each step, and the one that may not (the ViT's mask token at mask ratio
    0) is frozen by the model. BatchNorm statistics stay per rank (broadcast_buffers=False), as released. A frozen
    module (no parameter requires a gradient, finetune.py) has nothing to all-reduce and is returned as it is."""
    if not env.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False, bucket_cap_mb=16, find_unused_parameters=False)


def failure_line(rank, global_step, timeout_minutes, error):
    """The line a rank logs when training fails with several ranks: the rank, the step, the error on one line; for a
    collective's timeout also what it means. `global_step` is the last finished optimiser step (None: none yet)."""
    where = ("before the first optimiser step of this start" if global_step is None
             else f"in global step {global_step + 1}")
    line = f"rank {rank} failed {where}: {type(error).__name__}: {' '.join(str(error).split())}"
    if "timed out" in line.lower():
        line += (f" (a collective waited dist_timeout_minutes={timeout_minutes:g} for a rank that hung or died; "
                 "torchrun --max-restarts restarts the job from the newest complete checkpoint)")
    return line


def cleanup_distributed():
    if is_initialized():
        dist.destroy_process_group()


def is_initialized():
    """True inside a process group; False in a world of one started without one."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size():
    """(rank, world size) of the process group; (0, 1) without one."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_max(tensor):
    """In-place MAX over ranks (no-op in a world of one)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier():
    if is_initialized():
        dist.barrier()


def all_gather_tensor(tensor):
    """[tensor of rank 0, ..., tensor of rank W-1] (same shape everywhere); [tensor] in a world of one."""
    if is_initialized():
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return out
    return [tensor]
