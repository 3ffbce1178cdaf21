"""Typed configs: every schema key has a typed field and back, built once from a resolved spec."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from evlm_cli.core.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    PairsConfig,
    Params,
    build,
    params_from_dict,
    to_dict,
)
from evlm_cli.core.packaged import minilm_dir
from evlm_cli.spec.load import load_schema, load_spec, resolve_ref
from tests.helpers.specs import DEMO_SPECS

ROOT = Path(__file__).resolve().parents[1]
SPECS = DEMO_SPECS + [ROOT / "tests/specs/tiny_vqa.yaml", ROOT / "tests/specs/tiny_itr.yaml"]


def schema_keys(node: dict, root: dict, prefix: str = "") -> set[str]:
    node = resolve_ref(node, root)
    keys = set()
    for key, prop in node.get("properties", {}).items():
        keys.add(prefix + key)
        keys |= schema_keys(prop, root, f"{prefix}{key}.")
    return keys


def config_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        hint = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            keys |= config_keys(inner[0], f"{prefix}{f.name}.")
    return keys


def test_every_schema_key_has_a_typed_field_and_back():
    schema = load_schema()
    # patch_size, stem, pos_init, activation and the Swin keys are vision-only in the schema,
    # one EncoderShape serves all three
    vision_only = {f"teacher.{e}.{k}" for e in ("text", "fusion")
                   for k in ("patch_size", "stem", "pos_init", "activation", "kind", "depths",
                             "window_size")}
    norm_free = {"teacher.vision.norm"}  # the vision encoder is always pre-norm (a ViT)
    load_time = {"extends"}  # resolved as the spec is read: params never carry it
    assert config_keys(Params) - vision_only - norm_free == schema_keys(schema, schema) - load_time


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_example_spec_builds_into_typed_params(path):
    spec = load_spec(path)
    params = params_from_dict(spec)
    assert params.prune.target_sparsity == spec["prune"]["target_sparsity"]
    assert isinstance(params.task_teacher.train, OptimConfig)
    assert isinstance(params.pretrain.train, OptimConfig)
    assert params.pretrain.weights.itm == spec["pretrain"]["weights"]["itm"]
    assert params.teacher.embed_dim == spec["teacher"]["embed_dim"]
    assert params.data.image_size == spec["data"]["image_size"]
    assert params.evaluate.k_test == spec["evaluate"]["k_test"]
    assert params.evaluate.latency.batch_sizes == tuple(spec["evaluate"]["latency"]["batch_sizes"])
    # back to plain data, the typed config says what the spec said (floats for numbers)
    assert json.loads(json.dumps(to_dict(params.prune))) == json.loads(json.dumps(
        {**spec["prune"], "train": {k: float(v) if k in ("epochs",) else v
                                    for k, v in spec["prune"]["train"].items()}}))


def test_a_stage_sees_only_the_sections_it_declares():
    spec = load_spec(ROOT / "tests/specs/tiny_vqa.yaml")
    params = params_from_dict(spec, ("seed", "task", "prune"))
    assert params.prune is not None and params.teacher is None and params.distill is None
    # the task-agnostic stages read no task and no task data
    params = params_from_dict(spec, ("seed", "pairs", "teacher", "pretrain"))
    assert params.pairs is not None and params.pretrain is not None
    assert params.task is None and params.data is None and params.task_teacher is None


def tiny_spec() -> dict:
    return load_spec(ROOT / "tests/specs/tiny_vqa.yaml")


def test_minilm_becomes_this_machines_directory_only_when_typed():
    spec = tiny_spec()
    spec["pairs"]["tokenizer"] = spec["teacher"]["init"]["text"] = "minilm"
    params = params_from_dict(spec)
    assert params.pairs.tokenizer == params.teacher.init.text == str(minilm_dir())
    assert spec["pairs"]["tokenizer"] == "minilm"  # the dictionary (params.yaml) keeps the name
    spec["pairs"]["tokenizer"] = "my/tok"
    assert params_from_dict(spec, ("pairs",)).pairs.tokenizer == "my/tok"


def test_one_file_or_several_become_a_tuple():
    data = tiny_spec()["data"]
    assert build(DataConfig, {**data, "train": "a.json"}).train == ("a.json",)
    assert build(DataConfig, {**data, "train": ["a.json", "b.json"]}).train == ("a.json", "b.json")
    assert build(DataConfig, {**data, "train": None}).train == ()
    pairs = tiny_spec()["pairs"]
    assert build(PairsConfig, {**pairs, "train": "p.json"}).train == ("p.json",)
    assert build(PairsConfig, {**pairs, "train": None}).train == ()


def test_data_has_no_tokenizer_of_its_own():
    # one tokenizer for every task: it lives with the pairs
    data = tiny_spec()["data"]
    with pytest.raises(ConfigError, match="unknown key 'tokenizer'"):
        build(DataConfig, {**data, "tokenizer": "minilm"})


def test_unknown_and_missing_keys_name_their_path():
    with pytest.raises(ConfigError, match=r"^task_teacher\.train: unknown key 'lrr'"):
        params_from_dict({"task_teacher": {"checkpoint": None, "checkpoint_format": "evlm",
                                          "lr_scale": 1.0,
                                          "label_smoothing": 0.0, "train": {"lrr": 1}}})
    with pytest.raises(ConfigError, match=r"^teacher: unknown key 'train'"):
        shape = {"layers": 1, "width": 8, "heads": 2, "ffn": 16}
        params_from_dict({"teacher": {"vision": shape, "text": shape, "fusion": shape,
                                      "train": {}}})
    with pytest.raises(ConfigError, match=r"teacher\.vision\.layers: missing"):
        params_from_dict({"teacher": {"vision": {}, "text": {}, "fusion": {}}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(OptimConfig, [1, 2])


def test_configs_are_frozen_and_have_no_defaults_of_their_own():
    optim = tiny_spec()["prune"]["train"]
    config = build(OptimConfig, {**optim, "lr": 0.0})
    assert config.lr == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    del optim["answer_balance"]  # the schema holds the defaults; a config never fills one in
    with pytest.raises(ConfigError, match="answer_balance: missing"):
        build(OptimConfig, optim)


def test_the_librarys_choices_are_the_schemas_enums():
    from evlm_cli.compress.l0 import MODES
    from evlm_cli.core.catalogue import CATALOGUE
    from evlm_cli.data.sources import PAIR_SOURCES, SOURCES
    from evlm_cli.models.config import POOLS

    schema = load_schema()
    props = schema["properties"]
    assert set(SOURCES) == set(props["data"]["properties"]["source"]["enum"])
    assert set(PAIR_SOURCES) == set(props["pairs"]["properties"]["source"]["enum"])
    assert set(MODES) == set(props["prune"]["properties"]["mode"]["enum"])
    assert set(POOLS) == set(props["teacher"]["properties"]["pool"]["enum"])
    assert set(CATALOGUE) == set(props["task"]["enum"])
    assert all(name == info.name for name, info in CATALOGUE.items())
    metrics = {m for info in CATALOGUE.values() for m in info.metrics}
    assert metrics == set(props["evaluate"]["properties"]["metric"]["enum"]) - {None}


def test_path_keys_name_real_keys_of_the_schema():
    from evlm_cli.core.config import PATH_KEYS

    keys = schema_keys(load_schema(), load_schema())
    assert {".".join(p.key) for p in PATH_KEYS} <= keys
