"""JSON Schema errors as one-line messages a user can act on: the key path, the line, and what
was expected, in the spec's own YAML words."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import jsonschema

from evlm_cli.spec.schema import load_schema
from evlm_cli.spec.words import JsonPath, describe, dotted, plural, quote, show, show_plain
from evlm_cli.spec.yaml_marks import Marks, mark_of, report

# Human wording for the schema's regular expressions.
PATTERN_HINTS = {"^[a-z0-9][a-z0-9_-]*$": "lowercase letters, digits, '_' and '-'",
                 "^[^:\\s]+:[0-9]+$": "host:port, e.g. 10.0.0.1:29400"}

TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def schema_problems(data: dict, marks: Marks) -> list[str]:
    """Every schema violation and non-finite number in `data`, one line each, ordered by line.

    JSON Schema lets NaN through every bound (each comparison with it is false), so non-finite
    numbers are found by walking the data. Where the schema refuses the value outright (a wrong
    type, an unknown key) its message stands alone; otherwise the non-finite message replaces
    the schema's bound messages for that key.
    """
    validator = jsonschema.Draft202012Validator(load_schema())
    explained: list[tuple[str, JsonPath, str]] = []
    for error in leaf_errors(validator.iter_errors(data)):
        explained += [(error.validator, tuple(where), message) for where, message in explain(error)]
    refused = [where for keyword, where, _ in explained
               if keyword in ("type", "additionalProperties")]
    non_finite = {path: f"{dotted(path)}: {show(value)} is not a finite number"
                  for path, value in non_finite_numbers(data)
                  if not any(path[:len(where)] == where for where in refused)}
    found = [(mark_of(marks, where), message) for _, where, message in explained
             if where not in non_finite]
    found += [(mark_of(marks, path), message) for path, message in non_finite.items()]
    return report(found)


def non_finite_numbers(value: Any, path: JsonPath = ()) -> Iterator[tuple[JsonPath, float]]:
    """(key path, value) of every NaN and infinity under `value` (YAML .nan, .inf, -.inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_numbers(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from non_finite_numbers(item, path + (index,))


def leaf_errors(errors: Iterator[jsonschema.ValidationError]) -> Iterator[jsonschema.ValidationError]:
    """Flatten $ref/anyOf wrappers so each reported error is the specific one."""
    for error in errors:
        if error.context:
            yield from leaf_errors(iter(error.context))
        else:
            yield error


def explain(error: jsonschema.ValidationError) -> list[tuple[JsonPath, str]]:
    """(key path, human message) pairs for one jsonschema error."""
    path = tuple(error.absolute_path)
    where = dotted(path)
    prefix = f"{where}: " if where else ""
    keyword, expected, value = error.validator, error.validator_value, error.instance
    if keyword == "additionalProperties":
        allowed = ", ".join(error.schema.get("properties", {}))
        unknown = [key for key in value if key not in error.schema.get("properties", {})]
        return [(path + (key,), f"{prefix}unknown key {quote(key)} (expected one of: {allowed})")
                for key in unknown]
    if keyword == "required":
        missing = [key for key in expected if key not in value]
        return [(path, f"{dotted(path + (key,))}: required key is missing") for key in missing]
    messages = {
        "type": lambda: f"expected {type_words(expected)}, got {describe(value)}",
        "enum": lambda: f"{show(value)} is not one of: {', '.join(show_plain(v) for v in expected)}",
        "minimum": lambda: f"{show(value)} is less than the minimum {show(expected)}",
        "maximum": lambda: f"{show(value)} is greater than the maximum {show(expected)}",
        "exclusiveMinimum": lambda: f"{show(value)} must be greater than {show(expected)}",
        "exclusiveMaximum": lambda: f"{show(value)} must be less than {show(expected)}",
        "pattern": lambda: f"{show(value)} must match {expected}" + pattern_hint(expected),
        "minItems": lambda: f"needs at least {plural(expected, 'item')}, got {len(value)}",
        "maxItems": lambda: f"takes at most {plural(expected, 'item')}, got {len(value)}",
        "uniqueItems": lambda: "lists " + ", ".join(show(v) for v in repeated(value)) + " more than once",
        "minLength": lambda: "must not be empty" if expected == 1
        else f"{show(value)} is shorter than {expected} characters",
        "maxLength": lambda: f"{show(value)} is longer than {expected} characters",
    }
    message = messages[keyword]() if keyword in messages else error.message
    return [(path, prefix + message)]


def pattern_hint(pattern: str) -> str:
    hint = PATTERN_HINTS.get(pattern)
    return f" ({hint})" if hint else ""


def repeated(items: list) -> list:
    counts = Counter(json.dumps(item, sort_keys=True) for item in items)
    return [json.loads(item) for item, count in counts.items() if count > 1]


def type_words(expected: str | list[str]) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)
    words = [TYPE_WORDS.get(name, name) for name in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
