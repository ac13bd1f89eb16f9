"""Crash-safe checkpoint files, the RNG state they carry, and the one safe way to read any checkpoint back
(docs/training.md, docs/safety.md).

Every file is written to `<path>.tmp.<pid>`, flushed and fsynced, then renamed over `<path>` (os.replace is atomic on
POSIX), and the directory entry is fsynced: a crash at any moment leaves either the old complete file or the new
complete file; the `<path>.tmp.<pid>` a killed process leaves behind is deleted when training starts again
(remove_stale_temp_files). Contents are tensors, numbers, strings and plain containers only, so `torch.load(...,
weights_only=True)` reads them back (no code runs while loading). `load` is the only torch.load of the project: it
refuses to run on a torch older than MIN_TORCH and turns every failure into one CheckpointError naming the file
(docs/safety.md).
"""
import errno
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch

from utils.cli import UserError

# torch.load(weights_only=True) can run code from a crafted file before torch 2.6, and its weights-only unpickler has
# a memory-corruption advisory (GHSA-63cw-57p8-fm3p) up to 2.9.1; 2.10 is the first release with neither.
# requirement.txt states the same floor.
MIN_TORCH = (2, 10)
ONLY = "only tensors, numbers, strings and containers are accepted (torch.load with weights_only=True)"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint was refused or cannot be read (a RuntimeError too, the type this loader raised before)."""


def atomic_save(obj, path):
    """torch.save `obj` to `path` so that `path` is never a partial file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """Call write(file) on a temporary file, fsync it and rename it over `path`. A full disk raises DiskFullError
    naming `path` and the free space; the temporary file is removed and an existing `path` is left as it was."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(_Writes(f))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Writes:
    """A file seen only through write(): torch.save then passes an OSError of the write on unchanged (given the file
    itself it reports a full disk as an opaque RuntimeError)."""

    def __init__(self, f):
        self.write, self.flush = f.write, f.flush


class DiskFullError(UserError):
    """A save ran out of disk space (or quota): one line naming the file and the free space left."""

    def __init__(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        super().__init__(f"cannot write checkpoint {path}: no space left on the device ({free_space(folder)} free in "
                         f"{folder}); the previous checkpoint is kept; free some space or point output= elsewhere, "
                         "then resume")


def free_space(folder):
    """Free bytes of the filesystem holding `folder`, human readable (e.g. '1.5 GiB')."""
    size = float(shutil.disk_usage(folder).free)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def temp_path(path):
    """The temporary file atomic_save writes before renaming it over `path`."""
    return f"{os.fspath(path)}.tmp.{os.getpid()}"


def remove_stale_temp_files(folder, names):
    """Delete the temporary files `<name>.tmp.<pid>` that atomic_save left in `folder` for any of `names` when its
    process was killed mid-save (at startup no save of this process is in progress). Only names of exactly that
    form are touched. -> sorted list of the removed paths."""
    if not os.path.isdir(folder):
        return []
    pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + r")\.tmp\.[0-9]+")
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if pattern.fullmatch(entry) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def torch_version(version=None):
    """(major, minor) of `version` (default: the installed torch), e.g. '2.10.0a0+git1234' -> (2, 10)."""
    match = re.match(r"(\d+)\.(\d+)", str(version if version is not None else torch.__version__))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def refusal_reason(error):
    """Why torch's weights-only reader refused a file, in our words. torch's own message suggests loading the file
    again without the restriction, which must never be done with a file from someone else: it is not passed on."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if found:
        return f"refused, it carries code or Python objects ({found.group(1)})"
    found = re.search(r"Unsupported operand (\d+)", str(error))
    if found:
        return (f"refused, not a tensor checkpoint (pickle opcode {found.group(1)} is not accepted: the file is "
                "another kind of pickle, or not a checkpoint at all)")
    return "refused, it carries code or Python objects"


def load(path, map_location="cpu"):
    """torch.load(path, weights_only=True): nothing in the file is executed. Raises FileNotFoundError, or
    CheckpointError naming the file when torch is too old to load safely or the file is refused or unreadable."""
    path = os.fspath(path)
    if torch_version() < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise CheckpointError(
            f"cannot load checkpoint {path}: refused, torch {torch.__version__} is older than {floor}, whose "
            "weights_only=True loader has known bypasses (code execution before 2.6, memory corruption up to 2.9.1); "
            f"install torch>={floor} (docs/safety.md)")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", path)
    try:
        with warnings.catch_warnings():
            # a pickle of another protocol gets a warning before it is refused: the refusal below says enough
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as error:
        why = f"{refusal_reason(error)}; nothing in it was run; {ONLY}"
    except Exception as error:  # RuntimeError (broken zip), OSError, EOFError, ... of a corrupt or truncated file
        first = " ".join(str(error).split()).split(". ")[0][:200]  # torch's first sentence says what broke
        detail = first if "weights_only" not in first else ""
        why = (f"not a PyTorch checkpoint, or truncated or corrupt ({type(error).__name__}"
               f"{': ' + detail if detail else ''}); {ONLY}")
    raise CheckpointError(f"cannot load checkpoint {path}: refused or unreadable: {why}") from None


def unwrap(model):
    """The module inside DDP (checkpoint keys never carry the 'module.' prefix)."""
    return model.module if hasattr(model, "module") else model


def rng_state():
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors/lists (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def checkpoint_path(output, rank):
    return os.path.join(output, f"checkpoint_gpu_{rank}.pt")


# How our optimisers run their step, not what they compute: kept from the optimiser we built, never from a file.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping this optimiser's implementation flags.

    torch copies every param-group entry from the file, flags included. A state_dict of a plain (non-fused) AdamW,
    e.g. the release's (`fused: None`), would turn our fused AdamW into the for-loop one, whose step() rejects the
    device-side found_inf that skips non-finite steps. So the flags are put back and the Adam step counters moved to
    where the fused/capturable kernels expect them (float32 on the parameter's device)."""
    flags = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].to(device=param.device, dtype=torch.float32)
