"""Telling weight files apart by their first bytes, not their names (no torch needed)."""

from __future__ import annotations

from pathlib import Path

# What a weight file may be, as messages say it.
WEIGHT_FILES = "a safetensors file or a torch .pth/.bin"
# Bytes enough to recognise every format below.
HEAD_BYTES = 9


def weights_format(head: bytes, size: int) -> str | None:
    """"safetensors", "torch" or None, from a file's first bytes (9 or more) and its size.

    safetensors: a little-endian u64 header length that fits the file, then the header's '{';
    torch.save: a zip archive (PK\\x03\\x04), or before torch 1.6 a pickle (protocol byte 0x80).
    """
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if len(head) < HEAD_BYTES:
        return None
    header_length = int.from_bytes(head[:8], "little")
    return "safetensors" if 2 <= header_length <= size - 8 and head[8:9] == b"{" else None


def file_weights_format(path: Path) -> str | None:
    """The format of the weight file at `path` (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return weights_format(head, Path(path).stat().st_size)
