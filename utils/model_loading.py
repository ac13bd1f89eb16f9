"""Load a saved backbone (model.pt or a released TransFace .pt) for evaluation, export or inference."""
import torch

from backbones import get_model


def read_state_dict(path, map_location="cpu"):
    """Read a backbone state_dict without unpickling code (weights_only=True).

    Accepts a bare state_dict (model.pt, released files), a training checkpoint (state_dict_backbone) and
    weights saved from a DDP-wrapped model ("module." prefix)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as error:  # pickle.UnpicklingError for refused globals, RuntimeError for broken zips
        raise ValueError(f"{path}: refused or unreadable; only tensor checkpoints load (torch.load with "
                         f"weights_only=True, which never runs pickled code): {error}") from None
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_backbone(path, network, network_kwargs=None, map_location="cpu"):
    """Build `network` and load `path` strictly; a key mismatch names the missing and unexpected keys."""
    model = get_model(network, **(network_kwargs or {}))
    state = read_state_dict(path, map_location)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                   for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        def first(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "") or "none"
        raise ValueError(
            f"{path} does not fit --network {network}: missing keys: {first(missing)}; "
            f"unexpected keys: {first(unexpected)}; shape mismatches (file vs model): {first(wrong_shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()
