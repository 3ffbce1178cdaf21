"""Shared test setup: one torch thread (the CPUs are shared) and a scratch working directory."""

import pytest

try:
    import torch
except ImportError:  # the spec and CLI tests do not need torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run the test inside an empty temporary directory, which it returns."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
