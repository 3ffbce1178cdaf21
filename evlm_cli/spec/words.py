"""How a spec problem is written: values as the user wrote them, key paths, and the error that
carries one line per problem."""

from __future__ import annotations

import math
from typing import Any

from evlm_cli.core.errors import SpecError

JsonPath = tuple
# Where a problem is: one key path, or candidates of which the first written in the file wins.
Where = JsonPath | list


class InvalidSpecError(SpecError):
    """A spec with one or more problems; str() gives one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def dotted(path: JsonPath) -> str:
    """('data', 'train', 1) -> 'data.train[1]'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def describe(value: Any) -> str:
    """A value with its kind, for 'expected X, got Y'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {show(value)}"
    if isinstance(value, int | float):
        return f"the number {show(value)}"
    if isinstance(value, str):
        return f"the string {show(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def show(value: Any) -> str:
    """A value as a user would write it: YAML-ish, strings in single quotes."""
    if isinstance(value, str):
        return quote(value)
    return show_plain(value)


def show_plain(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    if isinstance(value, list):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def quote(value: Any) -> str:
    if not isinstance(value, str):
        return show_plain(value)
    if not value.isprintable():  # keep every message on one line
        value = value.encode("unicode_escape").decode("ascii")
    return "'" + value.replace("'", "''") + "'"
