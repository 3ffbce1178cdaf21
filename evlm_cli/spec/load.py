"""The one spec loader: YAML with line marks -> schema-checked, defaulted, semantically checked spec."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from evlm_cli.core.config import ENCODERS, PATH_KEYS, ConfigError, params_from_dict
from evlm_cli.core.errors import SpecError
from evlm_cli.core.fileformat import WEIGHT_FILES, file_weights_format
from evlm_cli.core.layout import MODEL_FILES, RESERVED_NAMES
from evlm_cli.core.packaged import EXPORT_INSTALL, EXPORT_PACKAGES, MINILM, local_path
from evlm_cli.data.sources import RENDERED_SOURCES, absent, source_problems

SCHEMA_PATH = Path(__file__).resolve().parent / "spec.schema.json"

METRICS_BY_TASK = {
    "vqa": ("vqa_accuracy",),
    "nlvr2": ("nlvr2_accuracy",),
    "retrieval": ("recall_at_k",),
    "captioning": ("cider", "bleu", "meteor", "rouge_l"),
}

# Human wording for the schema's regular expressions.
PATTERN_HINTS = {"^[a-z0-9][a-z0-9_-]*$": "lowercase letters, digits, '_' and '-'"}

# Hub ids have no file suffix; a missing 'weights.pth' is a missing file, not a hub id.
FILE_SUFFIXES = (".json", ".txt", ".pt", ".pth", ".th", ".bin", ".safetensors", ".ckpt", ".npz")


JsonPath = tuple
# Where a problem is: one key path, or candidates of which the first written in the file wins.
Where = JsonPath | list


class InvalidSpecError(SpecError):
    """A spec with one or more problems; str() gives one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@cache
def load_schema() -> dict:
    """The spec's JSON Schema, read once."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- public API


def load_spec(path: str | os.PathLike) -> dict:
    """Read, validate and resolve the spec at `path`; raise InvalidSpecError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidSpecError([f"{source}: cannot read the spec: {reason}"]) from None
    return validate_spec_text(text, source)


def validate_spec_text(text: str, source: str) -> dict:
    """Validate spec YAML `text` (named `source` in messages); return the resolved spec."""
    data, lines = parse_yaml(text, source)
    problems = schema_problems(data, lines, source)
    if problems:
        raise InvalidSpecError(problems)
    spec = fill_defaults(copy.deepcopy(data), load_schema())
    fill_task_defaults(spec)
    found = sorted({(line_of(lines, where), message) for where, message in semantic_problems(spec)})
    if found:
        raise InvalidSpecError([f"{source}:{line}: {message}" for line, message in found])
    spec = resolve(spec)
    try:  # what every stage will build from its params: a mismatch is found now, not mid-run
        params_from_dict(spec)
    except ConfigError as error:
        raise InvalidSpecError([f"{source}: {error} (the schema and evlm_cli/core/config.py disagree)"]) from error
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


# ---------------------------------------------------------------- YAML with lines


def parse_yaml(text: str, source: str) -> tuple[Any, dict[JsonPath, int]]:
    """Parse YAML into plain data plus a map from key path to 1-based line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise InvalidSpecError([f"{source}: the spec is empty"])
        lines: dict[JsonPath, int] = {(): node.start_mark.line + 1}
        duplicates = record_lines(node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        raise InvalidSpecError([yaml_problem(error, source)]) from None
    except yaml.YAMLError as error:
        raise InvalidSpecError([f"{source}: invalid YAML: {error}"]) from None
    finally:
        loader.dispose()
    if duplicates:
        raise InvalidSpecError([f"{source}:{line}: {message}" for line, message in duplicates])
    if not isinstance(data, dict):
        raise InvalidSpecError([
            f"{source}:{lines[()]}: the spec must be a mapping of keys to values, got {describe(data)}"
        ])
    return data, lines


def yaml_problem(error: yaml.MarkedYAMLError, source: str) -> str:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or error.context or "cannot parse"
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"


def record_lines(node: yaml.Node, path: JsonPath, lines: dict) -> list[tuple[int, str]]:
    """Fill `lines` for every key and item under `node`; return duplicate-key problems."""
    duplicates: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        first_lines: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if key in first_lines:
                duplicates.append((key_node.start_mark.line + 1,
                                   f"{dotted(path + (key,))}: duplicate key (first on line "
                                   f"{first_lines[key]})"))
            first_lines.setdefault(key, key_node.start_mark.line + 1)
            lines.setdefault(path + (key,), key_node.start_mark.line + 1)
            duplicates += record_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.setdefault(path + (index,), item.start_mark.line + 1)
            duplicates += record_lines(item, path + (index,), lines)
    return duplicates


def line_of(lines: dict[JsonPath, int], where: Where) -> int:
    """Line of a key path, or of the first of several candidate paths written in the file.

    Keys filled from defaults have no line: the nearest written ancestor's line is used.
    """
    candidates = where if isinstance(where, list) else [where]
    for candidate in candidates:
        if tuple(candidate) in lines:
            return lines[tuple(candidate)]
    path = tuple(candidates[0])
    while path not in lines:
        path = path[:-1]
    return lines[path]


# ---------------------------------------------------------------- schema errors


def schema_problems(data: dict, lines: dict, source: str) -> list[str]:
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
    found = [(line_of(lines, where), message) for _, where, message in explained
             if where not in non_finite]
    found += [(line_of(lines, path), message) for path, message in non_finite.items()]
    found = sorted(set(found), key=lambda item: item[0])
    return [f"{source}:{line}: {message}" for line, message in found]


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


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def pattern_hint(pattern: str) -> str:
    hint = PATTERN_HINTS.get(pattern)
    return f" ({hint})" if hint else ""


def repeated(items: list) -> list:
    counts = Counter(json.dumps(item, sort_keys=True) for item in items)
    return [json.loads(item) for item, count in counts.items() if count > 1]


TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def type_words(expected: str | list[str]) -> str:
    names = [expected] if isinstance(expected, str) else list(expected)
    words = [TYPE_WORDS.get(name, name) for name in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


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


def dotted(path: JsonPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# ---------------------------------------------------------------- defaults


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


def fill_task_defaults(spec: dict) -> None:
    """Defaults that depend on other keys: the metric follows the task."""
    if spec["evaluate"]["metric"] is None:
        spec["evaluate"]["metric"] = METRICS_BY_TASK[spec["task"]][0]


# ---------------------------------------------------------------- semantic checks


def semantic_problems(spec: dict) -> list[tuple[Where, str]]:
    """Rules the schema cannot say: (key path, message) for each broken one."""
    return [
        *layer_problems(spec),
        *shape_problems(spec),
        *data_problems(spec),
        *metric_problems(spec),
        *path_problems(spec),
        *checkpoint_problems(spec),
        *init_text_problems(spec),
        *norm_problems(spec),
        *scope_problems(spec),
        *export_problems(spec),
    ]


def norm_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """BERT and X-VLM weights are post-norm: an encoder that imports them must be post-norm too."""
    t = spec["teacher"]
    xvlm = t["checkpoint"] is not None and t["checkpoint_format"] == "xvlm"
    imports = {
        "text": "teacher.init.text" if t["init"]["text"] else "teacher.checkpoint" if xvlm else None,
        "fusion": ("teacher.checkpoint" if xvlm else "teacher.init.fusion_from_text"
                   if t["init"]["text"] and t["init"]["fusion_from_text"] else None),
    }
    for encoder, source in imports.items():
        if source and t[encoder]["norm"] == "pre":
            yield (("teacher", encoder, "norm"),
                   f"teacher.{encoder}.norm: pre cannot load the post-norm BERT weights of "
                   f"{source}; use post")


def export_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """An export needs its optional packages: refuse now, not after hours of training."""
    if spec.get("export") is None:
        return
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        yield (("export",), f"export: needs the package{'s' if len(missing) > 1 else ''} "
                            f"{' and '.join(missing)}: {EXPORT_INSTALL}")


def scope_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """What the schema can say but evlm cannot do yet, refused before anything is written."""
    if spec["name"] in RESERVED_NAMES:
        yield ("name",), (f"name: {quote(spec['name'])} is reserved for the stages specs share; "
                          "pick another")
    if spec["task"] == "captioning" and shutil.which("java") is None:
        yield ("task",), ("task: captioning's metrics (pycocoevalcap's tokenizer and METEOR) "
                          "need Java: put a JRE 8 or newer on PATH")
    if spec.get("export") is not None and spec["task"] != "vqa":
        yield ("export",), (f"export: the {spec['task']} task cannot be exported yet (only "
                            "vqa's single scoring graph is); set export: null")
    # Only questions and statements have answers to balance; pairs and captions are sampled
    # evenly.
    stages = {"pretrain": spec["pretrain"], "distill": spec["distill"]}
    if spec["task"] not in ("vqa", "nlvr2"):
        stages |= {k: spec[k] for k in ("task_teacher", "prune", "finetune")}
    for section, settings in stages.items():
        if settings["train"]["answer_balance"]:
            yield (section, "train", "answer_balance"), (
                f"{section}.train.answer_balance: image-text pairs have no answers to balance; "
                "use 0")
    if spec["resources"]["nodes"] > 1:
        yield ("resources", "nodes"), (f"resources.nodes: {spec['resources']['nodes']} is not "
                                       "implemented yet (one node, several processes is): use 1")
    processes = spec["resources"]["processes"]
    for section in ("pretrain", "distill", "task_teacher", "prune", "finetune"):
        size = spec[section]["train"]["batch_size"]
        if size % processes:
            yield ("resources", "processes"), (
                f"{section}.train.batch_size: {size} does not split evenly over "
                f"resources.processes = {processes} (it is the global batch)")
    crop = spec["augment"]["crop_scale"]
    if crop is not None and crop[0] > crop[1]:
        yield ("augment", "crop_scale"), (f"augment.crop_scale: [{crop[0]:g}, {crop[1]:g}] is "
                                          "not a range (low first)")
    source = spec["data"]["source"]
    if source in RENDERED_SOURCES and spec["data"]["storage"] == "files":
        yield ("data", "storage"), (f"data.storage: {source} renders its images into a "
                                    "temporary folder, so they cannot be read from files later; "
                                    "use auto or memory")
    prune = spec["prune"]
    if prune["mode"] == "modal-adaptive" and prune["min_keep"] > 1 - prune["target_sparsity"] + 1e-9:
        yield [("prune", "min_keep"), ("prune", "target_sparsity")], (
            f"prune.min_keep: {prune['min_keep']:g} is more than 1 - target_sparsity = "
            f"{1 - prune['target_sparsity']:g}; no encoder could keep that much")
    units = prune["units"]
    if "heads" not in units and "ffn" not in units:
        yield ("prune", "units"), "prune.units: needs heads or ffn (layers alone prune nothing)"
    elif "layers" in units and not {"heads", "ffn"} <= set(units):
        yield ("prune", "units"), ("prune.units: layers needs both heads and ffn (a sublayer "
                                   "gate's cost is the units it covers)")


def layer_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    student, teacher = spec["student"], spec["teacher"]
    for encoder in ENCODERS:
        kept, total = student[f"{encoder}_layers"], teacher[encoder]["layers"]
        if kept > total:
            yield ([("student", f"{encoder}_layers"), ("teacher", encoder, "layers")],
                   f"student.{encoder}_layers: {kept} is more than teacher.{encoder}.layers {total}")
            continue
        layer_map = student["layer_map"][encoder]
        if layer_map is None:
            continue
        where = ("student", "layer_map", encoder)
        name = dotted(where)
        if len(layer_map) != kept:
            yield where, (f"{name}: lists {plural(len(layer_map), 'layer')}, but "
                          f"student.{encoder}_layers is {kept}")
        elif any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False)):
            yield where, f"{name}: {show(layer_map)} must be strictly increasing"
        elif layer_map[-1] >= total:
            yield where, (f"{name}: layer {layer_map[-1]} does not exist in a teacher with "
                          f"{total} {encoder} layers (indices start at 0)")


def shape_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    teacher = spec["teacher"]
    for encoder in ENCODERS:
        width, heads = teacher[encoder]["width"], teacher[encoder]["heads"]
        if width % heads:
            yield (([("teacher", encoder, "width"), ("teacher", encoder, "heads")],
                    f"teacher.{encoder}.width: {width} is not a multiple of "
                    f"teacher.{encoder}.heads {heads}"))
    pairs, data = spec["pairs"], spec["data"]
    if data["max_text_len"] > pairs["max_text_len"] and teacher["init"]["text"] is None:
        yield ([("data", "max_text_len"), ("pairs", "max_text_len")],
               f"data.max_text_len: {data['max_text_len']} is more than pairs.max_text_len "
               f"{pairs['max_text_len']}, the teacher's text positions")
    max_len = spec["evaluate"]["max_len"]
    if (spec["task"] == "captioning" and max_len is not None and max_len >= pairs["max_text_len"]
            and teacher["init"]["text"] is None):
        # A caption of max_len tokens follows its begin token: max_len + 1 positions.
        yield ([("evaluate", "max_len"), ("pairs", "max_text_len")],
               f"evaluate.max_len: {max_len} tokens after the begin token need more than "
               f"pairs.max_text_len {pairs['max_text_len']}, the teacher's text positions")
    # A task at another image size than the pairs resamples the pre-trained positions to its
    # own patch grid, so each size needs whole patches.
    patch = teacher["vision"]["patch_size"]
    for section in ("data", "pairs"):
        size = spec[section]["image_size"]
        if size % patch:
            yield ([("teacher", "vision", "patch_size"), (section, "image_size")],
                   f"teacher.vision.patch_size: {patch} does not divide {section}.image_size "
                   f"{size}")
    if teacher["init"]["fusion_from_text"]:
        if teacher["init"]["text"] is None:
            yield (("teacher", "init", "fusion_from_text"),
                   "teacher.init.fusion_from_text: needs teacher.init.text")
        for key in ("width", "heads", "ffn"):
            if teacher["fusion"][key] != teacher["text"][key]:
                yield (("teacher", "fusion", key),
                       f"teacher.fusion.{key}: {teacher['fusion'][key]} must equal teacher.text.{key} "
                       f"{teacher['text'][key]} when teacher.init.fusion_from_text is true")


def data_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """What the data source needs (evlm_cli.data.sources), located at the field or the source."""
    data = spec["data"]
    for field, message in source_problems(data["source"], spec["task"], data["train"],
                                          data["test"], data["image_root"], data["answer_list"]):
        # A missing field has no line: the source that needs it is where the problem is.
        where = [("data", field), ("data", "source"), ("task",)]
        yield where, f"data.{field}: {message}"
    pairs = spec["pairs"]
    if pairs["source"] == "xvlm-json":
        for field in ("train", "image_root"):
            if absent(pairs[field]):
                yield ([("pairs", field), ("pairs", "source")],
                       f"pairs.{field}: required when the source is xvlm-json")


def metric_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    metric, task = spec["evaluate"]["metric"], spec["task"]
    fitting = METRICS_BY_TASK[task]
    if metric not in fitting:
        yield ([("evaluate", "metric"), ("task",)],
               f"evaluate.metric: {metric} does not fit task {task} (use {' or '.join(fitting)})")


def path_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    for path_key in PATH_KEYS:
        where, kind = path_key.key, path_key.names
        may_be_hub_id, may_be_minilm = path_key.may_be_hub_id, path_key.may_be_packaged
        value = lookup(spec, where)
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if item is None or (may_be_minilm and item == MINILM) or path_exists(item):
                continue
            item_where = where + (index,) if isinstance(value, list) else where
            name = dotted(item_where)
            if may_be_hub_id and looks_like_hub_id(item):
                yield item_where, (f"{name}: {quote(item)} looks like a model-hub id; evlm never "
                                   f"downloads: pass a local {kind} instead")
            else:
                yield item_where, f"{name}: {kind} {quote(item)} does not exist"


def path_exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte: no such file either way
        return False


def checkpoint_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """An existing checkpoint must look like one of its format, by its first bytes only.

    evlm: a directory with config.json and model.safetensors; xvlm: a safetensors file, a torch
    zip checkpoint or a legacy torch pickle. teacher.checkpoint may be either; a task teacher is
    an evlm model. (A missing one is path_problems' to report.)
    """
    teacher = spec["teacher"]
    yield from _checkpoint_problems(("teacher", "checkpoint"), teacher["checkpoint"],
                                    teacher["checkpoint_format"])
    yield from _checkpoint_problems(("task_teacher", "checkpoint"),
                                    spec["task_teacher"]["checkpoint"], "evlm")


def _checkpoint_problems(where: JsonPath, value: str | None, fmt: str
                         ) -> Iterator[tuple[Where, str]]:
    if value is None or not path_exists(value):
        return
    name, path = dotted(where), Path(value)
    if fmt == "evlm":
        expected = ("expected an evlm checkpoint: a directory with config.json and "
                    "model.safetensors")
        if not path.is_dir():
            hint = "; an X-VLM file needs teacher.checkpoint_format: xvlm" if where[0] == "teacher" else ""
            yield where, f"{name}: {quote(value)} is not a directory ({expected}{hint})"
            return
        missing = [file for file in MODEL_FILES if not (path / file).is_file()]
        if missing:
            yield where, f"{name}: {quote(value)} has no {' or '.join(missing)} ({expected})"
        return
    expected = f"expected {WEIGHT_FILES}"
    if path.is_dir():
        yield where, (f"{name}: {quote(value)} is a directory ({expected}; an evlm "
                      "directory needs teacher.checkpoint_format: evlm)")
        return
    try:
        found = file_weights_format(path)
    except OSError as error:
        yield where, f"{name}: cannot read {quote(value)}: {error.strerror or error}"
        return
    if found is None:
        yield where, f"{name}: {quote(value)} is not a checkpoint ({expected})"


def looks_like_hub_id(value: str) -> bool:
    """'bert-base-uncased' or 'openai/clip-vit-base-patch16', not './x', '/x' or 'a/b/c'."""
    if value.startswith((".", "/", "~")) or "\\" in value or value.lower().endswith(FILE_SUFFIXES):
        return False
    return value.count("/") <= 1


def init_text_problems(spec: dict) -> Iterator[tuple[Where, str]]:
    """The text encoder's shape must fit the pretrained model it starts from."""
    text_init = spec["teacher"]["init"]["text"]
    if text_init is None:
        return
    directory = Path(local_path(text_init))
    config_file = directory / "config.json"
    if not config_file.is_file():
        if directory.exists():
            yield (("teacher", "init", "text"),
                   f"teacher.init.text: {quote(text_init)} has no config.json (expected an HF BERT "
                   "directory)")
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        yield (("teacher", "init", "text"), f"teacher.init.text: cannot read {config_file}: {error}")
        return
    text = spec["teacher"]["text"]
    expected = {"width": "hidden_size", "heads": "num_attention_heads", "ffn": "intermediate_size"}
    for key, config_key in expected.items():
        if config_key in config and text[key] != config[config_key]:
            yield (("teacher", "text", key),
                   f"teacher.text.{key}: {text[key]} does not match {config_key} "
                   f"{config[config_key]} of teacher.init.text")
    available = config.get("num_hidden_layers")
    if available is not None and text["layers"] > available:
        yield (("teacher", "text", "layers"),
               f"teacher.text.layers: {text['layers']} is more than the {available} layers of "
               "teacher.init.text")


def lookup(spec: dict, where: JsonPath) -> Any:
    for key in where:
        spec = spec[key]
    return spec


# ---------------------------------------------------------------- resolution


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
