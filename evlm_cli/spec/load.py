"""The one spec loader: YAML with line marks and its bases -> schema-checked, defaulted, rule-checked spec."""

from __future__ import annotations

import copy
import os

from evlm_cli.core.catalogue import CATALOGUE
from evlm_cli.core.config import ConfigError, params_from_dict
from evlm_cli.spec.extends import EXTENDS, read_spec, read_spec_text
from evlm_cli.spec.messages import schema_problems
from evlm_cli.spec.rules import looks_like_hub_id, rule_problems
from evlm_cli.spec.schema import SCHEMA_PATH, fill_defaults, load_schema, resolve_ref
from evlm_cli.spec.words import InvalidSpecError
from evlm_cli.spec.yaml_marks import Marks, located

# Imported from here by the CLI, the tests and the benchmarks.
__all__ = ["SCHEMA_PATH", "InvalidSpecError", "load_schema", "load_spec", "looks_like_hub_id",
           "resolve_ref", "seed_runs", "validate_spec_text"]


def load_spec(path: str | os.PathLike) -> dict:
    """Read, validate and resolve the spec at `path`; raise InvalidSpecError listing every problem."""
    return validated(*read_spec(path))


def validate_spec_text(text: str, source: str) -> dict:
    """Validate spec YAML `text` (named `source` in messages); return the resolved spec."""
    return validated(*read_spec_text(text, source))


def validated(data: dict, marks: Marks) -> dict:
    """The spec `data` (its bases merged in) checked, defaulted and resolved."""
    problems = schema_problems(data, marks)
    if problems:
        raise InvalidSpecError(problems)
    spec = fill_defaults(copy.deepcopy(data), load_schema())
    del spec[EXTENDS]  # resolved already: params never carry it
    fill_task_defaults(spec)
    problems = located(marks, rule_problems(spec))
    if problems:
        raise InvalidSpecError(problems)
    spec = resolve(spec)
    try:  # what every stage will build from its params: a mismatch is found now, not mid-run
        params_from_dict(spec)
    except ConfigError as error:
        raise InvalidSpecError([f"{marks[()].source}: {error} (the schema and "
                                "evlm_cli/core/config.py disagree)"]) from error
    return spec


def fill_task_defaults(spec: dict) -> None:
    """Defaults that depend on other keys: the metric follows the task."""
    if spec["evaluate"]["metric"] is None:
        spec["evaluate"]["metric"] = CATALOGUE[spec["task"]].headline


def resolve(spec: dict) -> dict:
    """Fill the values that follow from others, so later code never re-derives them.

    `minilm` stays a name here (`local_path` finds it when a stage reads it): a site-packages
    path in params.yaml would make the shared stages' hashes differ between machines.
    """
    init, pairs = spec["teacher"]["init"], spec["pairs"]
    if pairs["tokenizer"] is None and init["text"] is not None:
        # The text embeddings index the pretrained vocabulary: its tokenizer must be used.
        pairs["tokenizer"] = init["text"]
    return spec


def seed_runs(spec: dict, seeds: list[int] | None = None) -> list[dict]:
    """The runs a resolved spec stands for: itself, or one per seed of `seeds` (else the
    spec's own `seeds`), each named `<name>-s<seed>` with that seed.

    In seed_scope compression, each run's shared stages keep the spec's seed (`shared_seed`),
    so the runs share the data split, the teachers and the distilled student, and differ from
    pruning on; in seed_scope all, every stage takes the run's seed.
    """
    chosen = spec["seeds"] if seeds is None else seeds  # distinct and >= 0: schema, --seeds
    if not chosen:
        return [spec]
    shared = spec["seed"] if spec["seed_scope"] == "compression" else None
    runs = []
    for seed in chosen:
        run = copy.deepcopy(spec)
        run.update(name=f"{spec['name']}-s{seed}", seed=seed, seeds=None, shared_seed=shared)
        runs.append(run)
    return runs
