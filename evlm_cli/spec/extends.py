"""`extends:`: a spec names a base spec and writes only what differs from it.

The base is found relative to the spec that names it, and may extend another in turn (a cycle
is refused). The spec's mappings merge over the base's key by key; anything else (a number, a
string, a list, null) replaces the base's value. The spec's `name` is its own: it must write
one. Every key keeps the mark of the file that wrote it, so a problem in a key that came from
the base names the base file and its line.
"""

from __future__ import annotations

import os
from pathlib import Path

from evlm_cli.spec.words import InvalidSpecError, JsonPath, describe, quote
from evlm_cli.spec.yaml_marks import Marks, parse_yaml

EXTENDS = "extends"


def read_spec(path: str | os.PathLike) -> tuple[dict, Marks]:
    """The spec at `path` with its bases merged in (no `extends` key left), and its marks."""
    return _read(str(path), ())


def read_spec_text(text: str, source: str) -> tuple[dict, Marks]:
    """As read_spec, for spec YAML `text` named `source` (a base is found next to `source`)."""
    return _resolve(text, source, ())


def _read(source: str, chain: tuple[tuple[Path, str], ...]) -> tuple[dict, Marks]:
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidSpecError([f"{source}: cannot read the spec: {reason}"]) from None
    return _resolve(text, source, chain)


def _resolve(text: str, source: str, chain: tuple[tuple[Path, str], ...]) -> tuple[dict, Marks]:
    """Parse `text`; when it extends a base, read the base (`chain`: the specs that led here)
    and merge over it."""
    data, marks = parse_yaml(text, source)
    if EXTENDS not in data:
        return data, marks
    named = data.pop(EXTENDS)
    mark = marks.pop((EXTENDS,))
    if named is None:  # the schema's default: no base
        return data, marks
    if not isinstance(named, str) or not named.strip():
        raise InvalidSpecError([f"{mark}: extends: expected the path of a base spec, got "
                                f"{describe(named)}"])
    if "name" not in data:
        raise InvalidSpecError([f"{mark}: name: required in a spec that extends another (its "
                                "runs need a name of their own)"])
    base_source = os.path.normpath(os.path.join(os.path.dirname(source), named))
    chain = chain + ((Path(source).resolve(), source),)
    visited = [identity for identity, _ in chain]
    base_identity = Path(base_source).resolve()
    if base_identity in visited:
        loop = [name for _, name in chain[visited.index(base_identity):]] + [base_source]
        raise InvalidSpecError([f"{mark}: extends: {quote(named)} leads back to a spec on the "
                                f"way here, a cycle: {' -> '.join(loop)}"])
    if not Path(base_source).is_file():
        raise InvalidSpecError([f"{mark}: extends: the base spec {quote(base_source)} does not "
                                "exist"])
    base, base_marks = _read(base_source, chain)
    merged, replaced = merge_over(base, data)
    kept = {path: where for path, where in base_marks.items()
            if not any(path[:len(key)] == key for key in replaced)}
    return merged, kept | marks


def merge_over(base: dict, child: dict, path: JsonPath = ()) -> tuple[dict, list[JsonPath]]:
    """`child` merged over `base`: a mapping over a mapping merges key by key, anything else
    replaces. Also returns the key paths whose base value was replaced (their marks go)."""
    merged, replaced = dict(base), []
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key], deeper = merge_over(base[key], value, path + (key,))
            replaced += deeper
        else:
            merged[key] = value
            replaced.append(path + (key,))
    return merged, replaced
