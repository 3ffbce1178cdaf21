"""Atomic writes: the final name holds the whole output or nothing, and no temporary is left."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from evlm_cli.core.io import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
)


def test_writes_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"b": 1, "a": [1, 2]}
    atomic_save_safetensors(tmp_path / "t.safetensors", {"x": torch.arange(6).reshape(2, 3).t()})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], torch.arange(6).reshape(2, 3).t())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "sub", "t.safetensors"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_directory_is_replaced_as_a_whole(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_path(target) as temp:
        temp.mkdir()
        (temp / "vocab.txt").write_text("[PAD]\n")
    assert [p.name for p in target.iterdir()] == ["vocab.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_outputs_are_not_private(tmp_path):
    """safetensors writes 0600 files; an output gets the mode any new file gets: 0666 less
    the umask, as a plain open() makes it."""
    umask = os.umask(0)
    os.umask(umask)
    atomic_save_safetensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    atomic_write_text(tmp_path / "a.txt", "text")
    (tmp_path / "plain.txt").write_text("text")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("t.safetensors", "a.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name
