"""Process-group setup for every way train.py is launched.

- torchrun (single or multi node): LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the environment.
- `python -m torch.distributed.launch`: passes --local-rank=N (or --local_rank with old torch) and sets the same env.
- plain `python train.py ...`: no env at all -> a world of one. No process group is created then (Partial FC and the
  loop run without collectives), so no port is ever needed.
The backend is nccl when CUDA is available, gloo otherwise.
"""
import os
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


def setup_distributed(local_rank_arg=None):
    """Initialise the process group if the launcher asked for one; return the DistEnv of this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set by the launcher
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistEnv(rank, local_rank, world_size, device)


def wrap_ddp(module, env):
    """`module` in DDP when there are several ranks, else `module` itself. find_unused_parameters=False (the release
    searched for unused ViT parameters every step, an extra pass over the autograd graph): every trainable parameter
    of every released layout gets a gradient each step, and the one that may not (the ViT's mask token at mask ratio
    0) is frozen by the model. BatchNorm statistics stay per rank (broadcast_buffers=False), as released."""
    if not env.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False, bucket_cap_mb=16, find_unused_parameters=False)


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
