"""Prepare stages: read the pre-training pairs and a task's dataset once, as fast tensors."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.core.config import Params
from evlm_cli.core.io import atomic_path
from evlm_cli.data.prepare import prepare, prepare_pairs


def run_prepare_pairs(params: Params, *, data: Path) -> dict:
    with atomic_path(data) as tmp:  # the folder appears whole or not at all
        return prepare_pairs(params.pairs, params.seed, tmp)


def run_prepare(params: Params, *, pairs: Path, data: Path) -> dict:
    with atomic_path(data) as tmp:
        return prepare(params.data, params.task, params.seed, tmp, Path(pairs) / "tokenizer")
