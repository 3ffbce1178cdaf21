"""Where evlm keeps things in a project folder: run outputs, shared stages, resume state."""

from __future__ import annotations

from pathlib import Path

# Each spec's outputs, under its name; `runs/shared/` holds the stages specs share.
RUNS = Path("runs")
SHARED = RUNS / "shared"
# Undeclared state outside DVC's outputs: resume checkpoints and the code fingerprints.
STATE = Path(".evlm")
WORK_ROOT = STATE / "work"
CODE_DIR = STATE / "code"
# Held while `evlm run` or `evlm compile` writes dvc.yaml and runs its stages.
PROJECT_LOCK = STATE / "project.lock"
# The name a spec may not take: it would collide with runs/shared/.
RESERVED_NAMES = ("shared",)
# What a model directory holds: its config (the per-layer shape) and its weights.
MODEL_CONFIG, MODEL_WEIGHTS = "config.json", "model.safetensors"
MODEL_FILES = (MODEL_CONFIG, MODEL_WEIGHTS)
