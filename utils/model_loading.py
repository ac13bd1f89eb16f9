"""Load a saved backbone (model.pt or a released TransFace .pt, or an exported .onnx) for evaluation, export or
inference. Every failure is a user error naming the file (utils/cli.py)."""
import os

import torch

from backbones import get_model
from utils import checkpoint as ckpt
from utils import checkpoint_set
from utils.checkpoint import CheckpointError
from utils.cli import UserError


def read_state_dict(path, map_location="cpu"):
    """Read a backbone state_dict without unpickling code (utils.checkpoint.load, weights_only=True).

    Accepts a bare state_dict (model.pt, released files), a training checkpoint (state_dict_backbone: a checkpoint
    set's shared.pt, its folder or an output folder, a checkpoint_gpu_*.pt) and weights saved from a DDP-wrapped
    model ("module." prefix)."""
    # an output folder (its newest complete checkpoint set) or a set's folder: the backbone of its shared.pt
    state = checkpoint_set.backbone_state_dict(path) if os.path.isdir(path) else ckpt.load(path, map_location)
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_backbone(path, network, network_kwargs=None, map_location="cpu"):
    """Build `network` and load `path` strictly; a key mismatch names the missing and unexpected keys."""
    model = get_model(network, **(network_kwargs or {}))
    load_strict(model, path, network, map_location)
    return model.eval()


def load_strict(model, path, network, map_location="cpu"):
    """Load the backbone weights in `path` into `model` (built as `network`), every key and shape checked: a
    mismatch is a CheckpointError naming the file and the missing, unexpected and mis-shaped keys. -> the state read."""
    state = read_state_dict(path, map_location)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                   for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        def first(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "") or "none"
        raise CheckpointError(
            f"{path} does not fit --network {network}: missing keys: {first(missing)}; "
            f"unexpected keys: {first(unexpected)}; shape mismatches (file vs model): {first(wrong_shape)}")
    model.load_state_dict(state, strict=True)
    return state


def open_onnx(path, device_type="cpu"):
    """onnxruntime session of the exported model `path` (CUDA provider first when device_type is "cuda")."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path}: running an .onnx model needs onnxruntime: pip install onnxruntime "
                        "(or onnxruntime-gpu)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    providers = ["CPUExecutionProvider"]
    if device_type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(path, providers=providers)
    except Exception as error:  # InvalidProtobuf, Fail, ... (ONNX files are protobuf: nothing in them is executed)
        raise UserError(f"{path}: not a loadable ONNX model ({' '.join(str(error).split())[:200]})") from None
