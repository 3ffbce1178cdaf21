"""Atomic file writes: an output either appears whole under its final name or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evlm_cli.core.ranks import is_main

if TYPE_CHECKING:  # the command line writes files too, and must not load torch to do it
    import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Some writers (safetensors) create private 0600 files; outputs get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()


def _fsync_file(path: Path) -> None:
    # Flush the data before the rename so a crash cannot leave a complete name over partial bytes.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on failure remove it.

    The temporary name lives in the same directory, so the final `os.replace` never crosses a
    file system. The writer may create a file or a directory there; an existing directory at
    `path` is replaced as a whole (moved aside first, since `os.replace` cannot overwrite a
    non-empty directory).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    temp = Path(temp_name)
    temp.unlink()  # the writer creates it, as a file or a directory
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"the writer created nothing at {temp} for {final}")
        if not is_main():  # under torchrun, rank 0 alone writes what the stage outputs
            _remove(temp)
            return
        if temp.is_file():
            os.chmod(temp, FILE_MODE)
            _fsync_file(temp)
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
            os.replace(temp, final)
            _remove(old)
        else:
            os.replace(temp, final)
    except BaseException:
        _remove(temp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """Write `value` as JSON (keys in insertion order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save `tensors` (made contiguous) as a safetensors file atomically."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as temp:
        save_file(contiguous, str(temp), metadata=dict(metadata) if metadata else None)
    return Path(path)
