"""YAML with line marks: plain data plus, for every key and list item, the file and line it
was written on, so each problem can name where to fix it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import yaml

from evlm_cli.spec.words import InvalidSpecError, JsonPath, Where, describe, dotted


class Mark(NamedTuple):
    """Where a key was written: a file (as the user named it) and a 1-based line."""

    source: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


Marks = dict[JsonPath, Mark]


def parse_yaml(text: str, source: str) -> tuple[dict, Marks]:
    """Parse a spec's YAML into a mapping plus the mark of every key path in it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise InvalidSpecError([f"{source}: the spec is empty"])
        marks: Marks = {(): Mark(source, node.start_mark.line + 1)}
        duplicates = record_marks(node, (), source, marks)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        raise InvalidSpecError([yaml_problem(error, source)]) from None
    except yaml.YAMLError as error:
        raise InvalidSpecError([f"{source}: invalid YAML: {error}"]) from None
    finally:
        loader.dispose()
    if duplicates:
        raise InvalidSpecError(report(duplicates))
    if not isinstance(data, dict):
        raise InvalidSpecError([
            f"{marks[()]}: the spec must be a mapping of keys to values, got {describe(data)}"
        ])
    return data, marks


def yaml_problem(error: yaml.MarkedYAMLError, source: str) -> str:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or error.context or "cannot parse"
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"


def record_marks(node: yaml.Node, path: JsonPath, source: str, marks: Marks
                 ) -> list[tuple[Mark, str]]:
    """Fill `marks` for every key and item under `node`; return duplicate-key problems."""
    duplicates: list[tuple[Mark, str]] = []
    if isinstance(node, yaml.MappingNode):
        first_lines: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                duplicates.append((Mark(source, line), f"{dotted(path + (key,))}: duplicate key "
                                                       f"(first on line {first_lines[key]})"))
            first_lines.setdefault(key, line)
            marks.setdefault(path + (key,), Mark(source, line))
            duplicates += record_marks(value_node, path + (key,), source, marks)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            marks.setdefault(path + (index,), Mark(source, item.start_mark.line + 1))
            duplicates += record_marks(item, path + (index,), source, marks)
    return duplicates


def mark_of(marks: Marks, where: Where) -> Mark:
    """Mark of a key path, or of the first of several candidate paths written in the spec.

    Keys filled from defaults have no mark: the nearest written ancestor's is used.
    """
    candidates = where if isinstance(where, list) else [where]
    for candidate in candidates:
        if tuple(candidate) in marks:
            return marks[tuple(candidate)]
    path = tuple(candidates[0])
    while path not in marks:
        path = path[:-1]
    return marks[path]


def report(found: Iterable[tuple[Mark, str]]) -> list[str]:
    """One 'file:line: message' per distinct problem, ordered by file and line."""
    return [f"{mark}: {message}" for mark, message in sorted(set(found))]


def located(marks: Marks, found: Iterable[tuple[Where, str]]) -> list[str]:
    """Problems found at key paths, as report() lines."""
    return report((mark_of(marks, where), message) for where, message in found)
