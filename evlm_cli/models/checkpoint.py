"""Save and load models as `model.safetensors` + `config.json`; the config carries the shape."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evlm_cli.core.errors import CheckpointError
from evlm_cli.core.fileformat import WEIGHT_FILES, file_weights_format
from evlm_cli.core.io import atomic_path, atomic_write_json
from evlm_cli.core.layout import MODEL_CONFIG as CONFIG
from evlm_cli.core.layout import MODEL_WEIGHTS as WEIGHTS
from evlm_cli.models.config import VLMConfig
from evlm_cli.models.vlm import VLM


def save_model(model: VLM, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "evlm"})
    atomic_write_json(directory / CONFIG, model.config.to_dict())


def read_config(directory: str | Path) -> VLMConfig:
    path = Path(directory) / CONFIG
    try:
        return VLMConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (a model directory holds {CONFIG} and {WEIGHTS})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid evlm model config ({e})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch checkpoint loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        # By content, as validation judges it: a safetensors file named .pth loads too.
        found = file_weights_format(path)
        if found is None:
            raise CheckpointError(f"{path}: not a checkpoint (expected {WEIGHT_FILES})")
        if found == "safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # X-VLM and many trainers nest the weights
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                strict: bool = True) -> list[str]:
    """Raise on any shape mismatch (naming the tensor); return the model keys the state lacks."""
    expected = model.state_dict()
    for key, want in expected.items():  # in model order, so the first bad tensor is named
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                                  f"the config says {tuple(want.shape)}")
    unexpected = [k for k in state if k not in expected]
    if strict and unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    missing = [k for k in expected if k not in state]
    if strict and missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return missing


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> VLM:
    """Rebuild the model from its config (any per-layer shape) and load its weights."""
    directory = Path(directory)
    cfg = read_config(directory)
    state = read_weights(directory / WEIGHTS)
    with torch.device("meta"):
        model = VLM(cfg)
    check_state(model, state, str(directory / WEIGHTS))
    model.load_state_dict(state, assign=True)
    return model.to(device)
