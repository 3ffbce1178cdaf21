"""A tiny project folder for tests that run stages: the tiny VQA spec, edited, written as
params files, with the pairs and the task data prepared (in process)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from evlm_cli.pipeline.entry import run_stage


@contextmanager
def prepared_project(root: Path, params: dict[str, dict]) -> Iterator[Path]:
    """Inside `root` (the working directory meanwhile): each spec of `params` written to its
    file name, and `pairs` and `data` prepared with the first one."""
    before = os.getcwd()
    os.chdir(root)
    try:
        for name, spec in params.items():
            (root / name).write_text(yaml.safe_dump(spec))
        p = ["--params", next(iter(params))]
        assert run_stage("prepare_pairs", [*p, "--data", "pairs"]) == 0
        assert run_stage("prepare", [*p, "--pairs", "pairs", "--data", "data"]) == 0
        yield root
    finally:
        os.chdir(before)
