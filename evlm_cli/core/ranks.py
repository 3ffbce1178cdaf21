"""Which process this is under torchrun, read from its environment: the base's one rank query,
so that writers below the training layer know whether they are rank 0 without importing it."""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes logs, checkpoints and outputs (rank 0)."""
    return world()[0] == 0
