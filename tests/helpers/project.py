"""Specs and compiled projects for the compiler tests: the tiny VQA spec, edited, and the stages
a compile wrote."""

import copy
from pathlib import Path

import yaml

from evlm_cli.spec.load import load_spec

# The tiny VQA spec every test that runs stages starts from.
TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny_vqa.yaml"


def tiny(name: str = "tiny_vqa", **changes) -> dict:
    """The tiny VQA spec named `name`, each dotted key of `changes` set to its value."""
    spec = copy.deepcopy(load_spec(TINY))
    spec["name"] = name
    for dotted, value in changes.items():
        node = spec
        *path, last = dotted.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return spec


def stages_of(root: Path) -> dict:
    """The stages of root/dvc.yaml."""
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
