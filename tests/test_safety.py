"""No file the project reads can run code.

Crafted checkpoints and .bin files whose unpickling would create a marker file are refused by every loader with an
error naming the file, and the marker never appears; the payloads are shown to be live (an unrestricted load does
create a marker). Legitimate files in the released layouts still load, and a static scan checks that every
torch.load in the project passes weights_only=True and that nothing else unpickles."""
import ast
import os
import pickle

import numpy as np
import pytest
import torch

import train
from backbones import get_model
from eval import verification
from utils import checkpoint as ckpt
from utils.distributed import DistEnv
from utils.model_loading import load_backbone, read_state_dict
from utils.resume import load_resume
from utils.utils_config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(embed_dim=32, num_heads=2, num_features=32)  # the vit_s_dp005_mask_0 key layout, tiny widths


class WritesMarker:
    """Unpickling this object calls open(marker, "w"): the file appearing proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_state_dict():
    torch.manual_seed(0)
    return get_model("vit_s_dp005_mask_0", **TINY_VIT).state_dict()


def evil_checkpoints(tmp_path, marker):
    """A backbone state_dict with one poisoned entry, a training checkpoint hiding it in the optimiser state, and
    the same in the legacy (non-zip) torch format."""
    state = dict(tiny_state_dict())
    state["blocks.0.norm1.weight"] = WritesMarker(marker)
    paths = {}
    paths["state_dict"] = tmp_path / "evil_model.pt"
    torch.save(state, paths["state_dict"])
    paths["training"] = tmp_path / "evil_checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": tiny_state_dict(), "state_optimizer": {"state": {0: WritesMarker(marker)}}},
               paths["training"])
    paths["legacy"] = tmp_path / "evil_legacy.pt"
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    return paths


def test_crafted_payloads_are_live(tmp_path):
    """Guard for the tests below: without the restriction these files do run code."""
    marker = tmp_path / "ran"
    paths = evil_checkpoints(tmp_path, marker)
    for path in paths.values():
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
    pickle.loads(pickle.dumps(([WritesMarker(marker), b"x"], [True])))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["state_dict", "training", "legacy"])
def test_checkpoint_with_code_refused_everywhere(tmp_path, kind):
    marker = tmp_path / "ran"
    path = evil_checkpoints(tmp_path, marker)[kind]
    name = os.path.basename(path)
    with pytest.raises(ValueError, match=f"{name}: refused or unreadable.*weights_only=True"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=f"{name}: refused or unreadable"):
        load_backbone(path, "vit_s_dp005_mask_0", TINY_VIT)
    with pytest.raises(RuntimeError, match=f"cannot load checkpoint .*{name}"):
        ckpt.load(path)
    assert not marker.exists()


def test_resume_from_poisoned_checkpoint_refused(tmp_path):
    """train.py's resume path reads checkpoint_gpu_<rank>.pt through utils.checkpoint.load."""
    marker = tmp_path / "ran"
    out = tmp_path / "job"
    out.mkdir()
    torch.save({"world_size": 1, "epoch": 0, "step_in_epoch": 1, "global_step": 1, "rng": WritesMarker(marker)},
               out / "checkpoint_gpu_0.pt")
    cfg = get_config(os.path.join(REPO, "configs", "tiny_cpu.py"), [f"output={out}", "resume=True"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*checkpoint_gpu_0.pt"):
        load_resume(cfg, env, train.init_logging(0, str(out)))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_bin_with_code_refused(tmp_path, protocol):
    marker = tmp_path / "ran"
    # the payload hidden inside an object ndarray: the numpy globals are allowed, the nested one is not
    hidden = np.empty(1, dtype=object)
    hidden[0] = WritesMarker(marker)
    for i, images in enumerate(([WritesMarker(marker), b"x"], [hidden, b"x"])):
        path = tmp_path / f"evil{i}_p{protocol}.bin"
        path.write_bytes(pickle.dumps((images, [True]), protocol=protocol))
        with pytest.raises(verification.BinLoadError, match=f"{path.name}: .*not allowed"):
            verification.load_bin(path)
        assert not marker.exists()


def test_hand_written_global_opcode_refused(tmp_path):
    """Protocol-0 GLOBAL + REDUCE written by hand (what a malicious .bin from the internet would contain)."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR.")
    with pytest.raises(verification.BinLoadError, match="evil.bin.*'builtins.open' is not allowed"):
        verification.load_bin(path)
    assert not marker.exists()


def test_legit_bin_still_loads(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    issame = [True, False]
    path = tmp_path / "lfw.bin"
    verification.write_bin(path, images, issame)
    (data, flipped), loaded = verification.load_bin(path)
    assert loaded == issame
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    assert torch.equal(data, expected) and torch.equal(flipped, expected.flip(3))


@pytest.mark.parametrize("legacy", [False, True])
def test_released_layout_still_loads(tmp_path, legacy):
    """A bare state_dict with the released keys (152 for vit_s_dp005_mask_0), zip or legacy format, loads strictly;
    so do a training checkpoint and DDP-prefixed weights."""
    state = tiny_state_dict()
    keys = list(state)
    assert len(keys) == 152 and keys[:3] == ["pos_embed", "mask_token", "patch_embed.proj.weight"]
    assert keys[-1].startswith("senet.") and state["feature.1.num_batches_tracked"].dtype == torch.int64
    variants = {"model.pt": state, "checkpoint_gpu_0.pt": {"state_dict_backbone": state, "epoch": 3},
                "ddp.pt": {"module." + k: v for k, v in state.items()}}
    for name, obj in variants.items():
        path = tmp_path / name
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        loaded = read_state_dict(path)
        assert list(loaded) == keys and all(torch.equal(loaded[k], state[k]) for k in keys)
        model = load_backbone(path, "vit_s_dp005_mask_0", TINY_VIT)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def project_sources():
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "work_dirs", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_every_load_in_the_project_is_restricted():
    """Static scan of the project (not the tests): torch.load always with weights_only=True, no pickle.load(s),
    no np.load(allow_pickle=True), no torch.jit.load of user files."""
    problems, torch_loads = [], 0
    for path in project_sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{os.path.relpath(path, REPO)}:{node.lineno} {name}"
            if name == "torch.load":
                torch_loads += 1
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(where + " without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "joblib.load"):
                problems.append(where)
            elif name in ("np.load", "numpy.load") and "allow_pickle" in kw:
                if not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                    problems.append(where + " with allow_pickle")
    assert torch_loads == 1  # utils/checkpoint.load, the one loader every checkpoint goes through
    assert problems == []
