"""Reading what the prepare stage wrote: JSON and safetensors files, with errors that say to prepare again."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from evlm_cli.core.errors import DataError

# A VQA folder's annotations for the official metric, per evaluation split (see prepare).
ANNOTATIONS = "annotations.json"


def read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); prepare again") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise DataError(f"{path}: cannot be read as safetensors ({error})") from error
