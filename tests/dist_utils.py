"""Run a function on W gloo ranks spawned from a test, and get each rank's return value back.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable-by-torch.save value

`fn` must be a module-level function (it is pickled into spawned processes).  Each rank writes its result (or its
traceback) to a file, then barriers, destroys the process group and leaves with os._exit(0): gloo processes that used
autograd-aware collectives sometimes abort in interpreter teardown (a SIGABRT), and skipping the teardown makes
the exit deterministic.  Results are read from the files, so the outcome never depends on the exit status.
"""
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, result_dir, fn, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        result = {"ok": True, "result": fn(rank, world_size, *args)}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    path = os.path.join(result_dir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)
    if result["ok"]:
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


def run_distributed(fn, world_size, *args, timeout=120.0):
    """Run fn(rank, world_size, *args) on `world_size` spawned CPU processes in one gloo group; list of results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        procs = [ctx.Process(target=_worker, args=(rank, world_size, port, result_dir, fn, args))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for rank, p in enumerate(procs):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} left no result (exit code {p.exitcode}, timeout {timeout} s)")
                continue
            result = torch.load(path, weights_only=True)
            if result["ok"]:
                results.append(result["result"])
            else:
                errors.append(f"rank {rank} failed:\n{result['error']}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
