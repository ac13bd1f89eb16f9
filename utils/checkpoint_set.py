"""The resumable checkpoint on disk: one folder per save, shared state written once, per-rank state once per rank
(docs/training.md, "Checkpoints").

    <output>/checkpoints/step_<global step, 9 digits>/
        shared.pt      rank 0: position, backbone, the backbone's optimiser state (and both param groups),
                       LR schedule, GradScaler -- identical on every rank (DDP all-reduces the gradients)
        rank_<r>.pt    rank r: its Partial FC shard and that shard's optimiser state, its backbone buffers
                       (BatchNorm statistics are not synchronised, as released), its RNG streams
        rank_<r>.done  rank r's completion marker (JSON: world size, step, its files and their sizes), written
                       after its files are fsynced and renamed into place

Every file is written atomically (utils/checkpoint.py); a set counts only when every rank's marker is there
(utils/checkpoint_policy.py). read_rank_state() puts a set back together as the per-rank dict that
utils/resume.py has always loaded (the keys of the single-file checkpoint_gpu_<rank>.pt of earlier versions).
"""
import json
import os
import re
import shutil

import torch

from utils import checkpoint as ckpt
from utils import checkpoint_policy as policy

FOLDER = "checkpoints"
SHARED = "shared.pt"
# keys of the per-rank dict that go into shared.pt (the rest, and the head's optimiser state, into rank_<r>.pt)
SHARED_KEYS = ("epoch", "step_in_epoch", "global_step", "world_size", "network", "state_lr_scheduler", "state_scaler")
HEAD_GROUP = -1  # train.build_optimizer: the Partial FC head is the last param group, the backbone's come first


def set_dir(output, step):
    return os.path.join(output, FOLDER, f"step_{step:09d}")


def rank_file(rank):
    return f"rank_{rank}.pt"


def marker_path(folder, rank):
    return os.path.join(folder, f"rank_{rank}.done")


def split_state(state, buffer_names):
    """A per-rank state dict -> (what rank 0 writes for all, what this rank writes for itself). `buffer_names`: the
    backbone's buffers, kept per rank."""
    optimizer = state["state_optimizer"]
    own_params = set(optimizer["param_groups"][HEAD_GROUP]["params"])
    backbone = state["state_dict_backbone"]
    shared = {key: state[key] for key in SHARED_KEYS}
    shared["state_dict_backbone"] = backbone
    shared["state_optimizer"] = {"state": {i: s for i, s in optimizer["state"].items() if i not in own_params},
                                 "param_groups": optimizer["param_groups"]}
    own = {"rank": state["rank"], "global_step": state["global_step"], "world_size": state["world_size"],
           "state_dict_softmax_fc": state["state_dict_softmax_fc"],
           "state_optimizer_head": {i: s for i, s in optimizer["state"].items() if i in own_params},
           "backbone_buffers": {name: backbone[name] for name in buffer_names if name in backbone},
           "rng": state["rng"]}
    return shared, own


def merge_state(shared, own):
    """The inverse of split_state: the per-rank state dict of rank own["rank"]."""
    state = {key: shared[key] for key in SHARED_KEYS}
    state.update(rank=own["rank"], state_dict_softmax_fc=own["state_dict_softmax_fc"], rng=own["rng"])
    state["state_dict_backbone"] = {**shared["state_dict_backbone"], **own["backbone_buffers"]}
    optimizer = shared["state_optimizer"]
    state["state_optimizer"] = {"state": {**optimizer["state"], **own["state_optimizer_head"]},
                                "param_groups": optimizer["param_groups"]}
    return state


def write_part(folder, rank, world_size, files):
    """Write this rank's `files` ({name: object}) into the set `folder`, then its completion marker. A marker left
    there by an earlier, killed run of the same step goes first, so the set is never complete with old files."""
    os.makedirs(folder, exist_ok=True)
    marker = marker_path(folder, rank)
    if os.path.exists(marker):
        os.remove(marker)
    sizes = {}
    for name, obj in files.items():
        path = os.path.join(folder, name)
        ckpt.atomic_save(obj, path)
        sizes[name] = os.path.getsize(path)
    step = int(os.path.basename(folder).split("_")[1])
    text = json.dumps({"rank": rank, "world_size": world_size, "global_step": step, "bytes": sizes})
    ckpt.atomic_write(marker, lambda f: f.write(text.encode()))
    return sizes


def scan(output):
    """The sets in `output` as policy.SetInfo, from their markers only (no checkpoint is opened)."""
    root = os.path.join(output, FOLDER)
    sets = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        found = re.fullmatch(r"step_([0-9]+)", entry)
        if not found:
            continue
        markers = {}
        try:
            names = os.listdir(os.path.join(root, entry))
        except FileNotFoundError:  # removed meanwhile by rank 0's clean-up
            continue
        for name in names:
            rank = re.fullmatch(r"rank_([0-9]+)\.done", name)
            if rank:
                try:
                    with open(os.path.join(root, entry, name)) as f:
                        markers[int(rank.group(1))] = int(json.load(f)["world_size"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # unreadable marker: that rank's part does not count
        sets.append(policy.SetInfo(int(found.group(1)), markers))
    return sets


def remove_sets(output, sets):
    """Delete these sets' folders. -> their paths."""
    paths = [set_dir(output, s.step) for s in sets]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return paths


def read_shared(folder):
    return ckpt.load(os.path.join(folder, SHARED))


def read_rank_state(folder, rank, shared=None):
    """The per-rank state dict of `rank` from the set `folder` (`shared`: its shared.pt, when already read)."""
    shared = read_shared(folder) if shared is None else shared
    return merge_state(shared, ckpt.load(os.path.join(folder, rank_file(rank))))


def newest_set(output):
    """The folder of the newest complete set in `output`, or None."""
    chosen, _ = policy.newest_complete(scan(output))
    return set_dir(output, chosen.step) if chosen is not None else None


def read_newest(output, rank):
    """The per-rank state dict of `rank` from the newest complete set in `output`."""
    folder = newest_set(output)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint set in {os.path.join(output, FOLDER)}")
    return read_rank_state(folder, rank)


def backbone_state_dict(path):
    """The backbone state_dict inside any of this project's training checkpoints: an output folder (its newest
    complete set), a set folder, a set's shared.pt, or a single-file checkpoint_gpu_<rank>.pt (this project's
    earlier versions and the release)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = path if os.path.exists(os.path.join(path, SHARED)) else newest_set(path)
        if folder is None:
            raise ckpt.CheckpointError(f"{path}: no complete checkpoint set (checkpoints/step_*/ with every rank's "
                                       f"marker) and no {SHARED} in it")
        path = os.path.join(folder, SHARED)
    saved = ckpt.load(path)
    if not isinstance(saved, dict) or "state_dict_backbone" not in saved:
        raise ckpt.CheckpointError(f"{path}: not a training checkpoint (no state_dict_backbone)")
    return saved["state_dict_backbone"]  # rank 0's, buffers included (what model.pt holds at an epoch's end)


def to_host(obj):
    """A copy of `obj` with every tensor copied to host memory, so training can go on changing the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(value) for value in obj)
    return obj
