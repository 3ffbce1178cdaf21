"""Prepare stage: read the task dataset once and write tensors later stages load fast."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.config import Params
from evlm_cli.data.prepare import prepare
from evlm_cli.io import atomic_path


def run_prepare(params: Params, *, data: Path) -> dict:
    with atomic_path(data) as tmp:  # the folder appears whole or not at all
        return prepare(params.data, params.task, params.seed, tmp)
