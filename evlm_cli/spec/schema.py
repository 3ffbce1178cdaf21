"""The spec's JSON Schema: read once, its $refs followed, its defaults filled in."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent / "spec.schema.json"


@cache
def load_schema() -> dict:
    """The spec's JSON Schema, read once."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def resolve_ref(schema_node: dict, root: dict) -> dict:
    """A schema node with its $ref target merged in; the node's own keys win."""
    if "$ref" not in schema_node:
        return schema_node
    target = root
    for part in schema_node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    merged = dict(resolve_ref(target, root))
    merged.update({key: value for key, value in schema_node.items() if key != "$ref"})
    return merged


def fill_defaults(instance: dict, schema_node: dict, root: dict | None = None) -> dict:
    """Fill absent keys from the schema, recursively, in place; return `instance`.

    An object's own default (a mapping) is merged in before its properties' defaults, so a
    use site of a shared $defs block can carry different defaults (prune.weights).
    """
    root = schema_node if root is None else root
    for key, prop in schema_node.get("properties", {}).items():
        prop = resolve_ref(prop, root)
        default = prop.get("default")
        if key not in instance:
            if "default" not in prop:
                continue
            instance[key] = copy.deepcopy(default)
        elif isinstance(instance[key], dict) and isinstance(default, dict):
            for sub_key, sub_value in default.items():
                instance[key].setdefault(sub_key, copy.deepcopy(sub_value))
        if isinstance(instance[key], dict) and "properties" in prop:
            fill_defaults(instance[key], prop, root)
    return instance
