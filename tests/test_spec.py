"""Tests of the spec loader: schema, defaults, semantic rules and the exact error lines."""

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from evlm_cli.core.config import params_from_dict
from evlm_cli.core.errors import SpecError
from evlm_cli.core.fileformat import weights_format
from evlm_cli.core.packaged import local_path, minilm_dir
from evlm_cli.data.sources import source_problems
from evlm_cli.spec.load import (
    SCHEMA_PATH,
    InvalidSpecError,
    load_schema,
    load_spec,
    looks_like_hub_id,
    resolve_ref,
    validate_spec_text,
)
from tests.helpers.specs import DEMO_SPECS, PAPER_SPECS, write_stand_ins

ROOT = Path(__file__).resolve().parent.parent
# A shipped spec's name starts with its task's short name.
TASK_OF_PREFIX = {"vqa": "vqa", "itr": "retrieval", "nlvr2": "nlvr2", "caption": "captioning",
                  "mosaic": "vqa"}
TEST_SPECS = Path(__file__).resolve().parent / "specs"
BAD_SPECS = sorted((TEST_SPECS / "bad").glob("*.yaml"))
SHIPPED_SPECS = DEMO_SPECS  # the paper-scale recipes are validated against stand-in files


def expected_lines(spec_file: Path) -> list[str]:
    """The '# expect: ' lines a bad spec starts with: every problem it must give, and no other."""
    lines = spec_file.read_text(encoding="utf-8").splitlines()
    expected = [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]
    assert lines and lines[0].startswith("# expect: "), f"{spec_file.name} must start with '# expect: '"
    return expected


def problems_of(path: str) -> list[str]:
    with pytest.raises(InvalidSpecError) as caught:
        load_spec(path)
    return caught.value.problems


def problems_of_text(text: str) -> list[str]:
    with pytest.raises(InvalidSpecError) as caught:
        validate_spec_text(text, "x.yaml")
    return caught.value.problems


def leaves(tree, prefix=()):
    """Every (key path, value) at the leaves of nested mappings."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, prefix + (key,))
    else:
        yield prefix, tree


# ---------------------------------------------------------------- malformed specs


def test_there_are_enough_malformed_specs():
    assert len(BAD_SPECS) >= 30


@pytest.mark.parametrize("spec_file", BAD_SPECS, ids=[path.stem for path in BAD_SPECS])
def test_malformed_spec_gives_the_expected_line(spec_file, monkeypatch):
    # Relative paths inside the bad specs (data/train.json) resolve against tests/specs.
    monkeypatch.chdir(TEST_SPECS)
    relative = f"bad/{spec_file.name}"
    expected = [line.replace("{path}", relative) for line in expected_lines(spec_file)]
    problems = problems_of(relative)
    assert sorted(problems) == sorted(expected)
    assert all("\n" not in problem for problem in problems)


def test_every_schema_error_is_collected(tmp_path):
    spec = tmp_path / "many.yaml"
    spec.write_text(
        "name: Bad\ntask: vqa\nseed: -1\nprune:\n  target_sparsity: 2\n  colour: red\n",
        encoding="utf-8",
    )
    problems = problems_of(str(spec))
    assert [problem.split(":")[1] for problem in problems] == ["1", "3", "5", "6"]
    assert f"{spec}:3: seed: -1 is less than the minimum 0" in problems


def test_spec_error_joins_problems_one_per_line():
    with pytest.raises(SpecError) as caught:
        validate_spec_text("name: a/b\ntask: nope\n", "x.yaml")
    assert str(caught.value).splitlines() == caught.value.problems
    assert len(caught.value.problems) == 2


@pytest.mark.parametrize("written, shown", [(".nan", ".nan"), (".NaN", ".nan"), (".inf", ".inf"),
                                             ("+.inf", ".inf"), ("-.inf", "-.inf")])
def test_non_finite_numbers_are_refused_alone(written, shown):
    # -.inf also breaks lr's minimum 0: the one message says what is wrong with the value
    problems = problems_of_text(f"name: bad\ntask: vqa\ndistill:\n  train:\n    lr: {written}\n")
    assert problems == [f"x.yaml:5: distill.train.lr: {shown} is not a finite number"]


def test_non_finite_number_of_the_wrong_type_or_key_gets_the_schema_message():
    problems = problems_of_text("name: .nan\ntask: vqa\nprune:\n  colour: .inf\nevaluate:\n"
                                "  latency:\n    batch_sizes: [1, .inf]\n")
    assert problems == [
        "x.yaml:1: name: expected a string, got the number .nan",
        "x.yaml:4: prune: unknown key 'colour' (expected one of: "
        + ", ".join(load_schema()["properties"]["prune"]["properties"]) + ")",
        "x.yaml:7: evaluate.latency.batch_sizes[1]: expected an integer, got the number .inf",
    ]


def test_unreadable_spec_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert problems_of(str(missing)) == [f"{missing}: cannot read the spec: No such file or directory"]


# ---------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("spec_file", SHIPPED_SPECS, ids=[path.stem for path in SHIPPED_SPECS])
def test_shipped_specs_are_valid_and_named_after_their_file(spec_file):
    spec = load_spec(spec_file)
    assert spec["name"] == spec_file.stem
    assert spec["task"] == TASK_OF_PREFIX[spec_file.stem.split("_")[0]]


def test_the_mosaic_spec_pretrains_as_the_default_but_for_its_positions():
    """Its teacher starts from 2-D sin-cos positions; everything task-agnostic else agrees, so
    the pairs are prepared once for both."""
    from evlm_cli.pipeline.compile import plan

    mosaic, default = (load_spec(ROOT / "specs" / f"{name}.yaml")
                       for name in ("mosaic_vqa_90pct", "vqa_50pct"))
    assert (mosaic["teacher"]["vision"]["pos_init"], default["teacher"]["vision"]["pos_init"]) == (
        "sincos", "normal")
    mosaic["teacher"]["vision"]["pos_init"] = "normal"
    for section in ("pairs", "teacher", "pretrain", "student", "distill"):
        assert mosaic[section] == default[section], section
    pairs = lambda spec: {s.name for s in plan(spec) if s.kind.name == "prepare_pairs"}  # noqa: E731
    assert pairs(load_spec(ROOT / "specs" / "mosaic_vqa_90pct.yaml")) == pairs(default)


def test_shipped_specs_of_different_tasks_share_the_task_agnostic_stages():
    # The point of the paper's graph: one pre-trained teacher and one distilled student for
    # every task, so these sections must agree for the shared stages to be shared.
    specs = [load_spec(ROOT / "specs" / f"{name}_50pct.yaml")
             for name in ("vqa", "nlvr2", "itr", "caption")]
    assert sorted(spec["task"] for spec in specs) == ["captioning", "nlvr2", "retrieval", "vqa"]
    for other in specs[1:]:
        for section in ("seed", "pairs", "teacher", "pretrain", "student", "distill"):
            assert specs[0][section] == other[section], (other["name"], section)


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_a_paper_recipe_validates_once_its_files_exist(name, tmp_path, monkeypatch):
    """Its paths are placeholders for the user's files: with stand-ins there, it validates and
    builds into typed params; without them, each missing one is named."""
    spec_file = ROOT / "specs" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)
    missing = problems_of(str(spec_file))
    stand_ins = write_stand_ins(spec_file, tmp_path)
    assert len(missing) == len(stand_ins)
    assert all("does not exist" in line or "pass a local" in line for line in missing)
    spec = load_spec(spec_file)
    assert spec["name"] == name and spec["task"] == TASK_OF_PREFIX[name.split("_")[1]]
    params_from_dict(spec)


def test_the_efficientvlm_recipe_names_the_papers_parts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_file = ROOT / "specs" / "efficientvlm_vqa.yaml"
    write_stand_ins(spec_file, tmp_path)
    spec = load_spec(spec_file)
    teacher, student = spec["teacher"], spec["student"]
    assert (teacher["checkpoint_format"], teacher["vision"]["patch_size"]) == ("xvlm", 16)
    assert [teacher[e]["layers"] for e in ("vision", "text", "fusion")] == [12, 6, 6]
    assert [student[f"{e}_layers"] for e in ("vision", "text", "fusion")] == [6, 3, 3]
    assert (spec["data"]["source"], spec["pairs"]["source"]) == ("xvlm-json", "xvlm-json")
    assert spec["data"]["answer_list"] and spec["pretrain"]["train"]["epochs"] == 0


def test_default_spec_writes_every_key_explicitly():
    written = yaml.safe_load((ROOT / "specs" / "vqa_50pct.yaml").read_text(encoding="utf-8"))
    resolved = load_spec(ROOT / "specs" / "vqa_50pct.yaml")
    assert {path for path, _ in leaves(written)} == {path for path, _ in leaves(resolved)}


RESOLVED = sorted((TEST_SPECS / "resolved").glob("*.json"))


@pytest.mark.parametrize("stored", RESOLVED, ids=[path.stem for path in RESOLVED])
def test_shipped_spec_resolves_to_exactly_its_stored_params(stored):
    """The resolved specs of the copies the `extends:` specs replaced, stored before they were
    replaced: the same params, so the same stages and the same runs. (A deliberate change to a
    spec or a default rewrites its file: json.dumps(load_spec(spec), indent=2).)"""
    resolved = load_spec(ROOT / "specs" / f"{stored.stem}.yaml")
    assert json.dumps(resolved, sort_keys=True) == json.dumps(json.loads(stored.read_text()),
                                                              sort_keys=True)


def test_every_shipped_spec_but_the_default_extends_another_and_has_stored_params():
    extending = {path.stem for path in SHIPPED_SPECS
                 if "extends" in yaml.safe_load(path.read_text(encoding="utf-8"))}
    assert extending == {path.stem for path in SHIPPED_SPECS} - {"vqa_50pct"}
    assert {path.stem for path in RESOLVED} == {path.stem for path in SHIPPED_SPECS}


@pytest.mark.parametrize("spec_file", SHIPPED_SPECS, ids=[path.stem for path in SHIPPED_SPECS])
def test_a_spec_that_extends_another_writes_only_what_differs_from_it(spec_file):
    written = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    base = written.pop("extends", None)
    if base is None:
        pytest.skip("extends nothing")
    resolved_base = dict(leaves(load_spec(spec_file.parent / base)))
    absent = object()  # `export: null` over the base's export settings is a change
    same = [path for path, value in leaves(written) if resolved_base.get(path, absent) == value]
    assert same == []


@pytest.mark.parametrize("name, task", [("tiny_vqa", "vqa"), ("tiny_itr", "retrieval")])
def test_tiny_test_specs_are_valid_and_tiny(name, task):
    spec = load_spec(TEST_SPECS / f"{name}.yaml")
    assert spec["task"] == task
    assert spec["data"]["limit"] == spec["pairs"]["limit"] == 256
    assert spec["teacher"]["init"]["text"] is None
    assert [spec["teacher"][encoder]["layers"] for encoder in ("vision", "text", "fusion")] == [2, 2, 2]


def test_tiny_test_specs_share_the_task_agnostic_sections():
    vqa, itr = (load_spec(TEST_SPECS / f"{name}.yaml") for name in ("tiny_vqa", "tiny_itr"))
    for section in ("pairs", "teacher", "pretrain", "student", "distill"):
        assert vqa[section] == itr[section], section
    # only VQA has answers to balance, so only its task teacher may balance them
    assert vqa["task_teacher"]["train"]["answer_balance"] == 0.25


# ---------------------------------------------------------------- defaults


def test_defaults_are_filled_into_a_minimal_spec():
    spec = validate_spec_text("name: minimal\ntask: vqa\n", "minimal.yaml")
    assert spec["prune"]["units"] == ["heads", "ffn"]
    assert spec["prune"]["target_sparsity"] == 0.5
    assert spec["task_teacher"]["train"]["lr"] == 1e-4
    assert spec["teacher"]["pool"] == "cls" and spec["task_teacher"]["checkpoint"] is None
    assert spec["pretrain"]["weights"] == {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    assert spec["pretrain"]["train"]["answer_balance"] == 0
    assert spec["pairs"]["source"] == "easy-vqa" and spec["pairs"]["vocab_size"] == 2000
    assert spec["pairs"]["image_size"] == spec["data"]["image_size"] == 64
    assert "tokenizer" not in spec["data"] and "vocab_size" not in spec["data"]
    assert "pool" not in spec["task_teacher"] and "train" not in spec["teacher"]
    assert spec["teacher"]["embed_dim"] == 256
    assert spec["evaluate"]["k_test"] == 256
    assert spec["finetune"]["train"]["max_steps"] is None
    assert spec["student"]["layer_map"] == {"vision": None, "text": None, "fusion": None}
    assert spec["evaluate"]["latency"]["batch_sizes"] == [1, 32]
    assert spec["evaluate"]["metric"] == "vqa_accuracy"
    assert spec["distill"]["weights"] == {"task": 1.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0}
    # the paper prunes with all three KD terms
    assert spec["prune"]["weights"] == {"task": 1.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0}


def test_partial_blocks_keep_their_use_site_defaults():
    spec = validate_spec_text(
        "name: partial\ntask: vqa\nprune:\n  weights: {task: 2.0}\ndistill:\n  weights: {task: 3.0}\n"
        "pretrain:\n  weights: {itm: 0.5}\n",
        "partial.yaml",
    )
    assert spec["prune"]["weights"] == {"task": 2.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0}
    assert spec["distill"]["weights"] == {"task": 3.0, "logits": 1.0, "hidden": 1.0, "attention": 1.0}
    assert spec["pretrain"]["weights"] == {"itc": 1.0, "itm": 0.5, "mlm": 1.0}


def test_filled_spec_still_satisfies_the_schema():
    spec = validate_spec_text("name: minimal\ntask: vqa\n", "minimal.yaml")
    jsonschema.Draft202012Validator(load_schema()).validate(spec)


@pytest.mark.parametrize("task, metric", [("vqa", "vqa_accuracy"), ("nlvr2", "nlvr2_accuracy"),
                                          ("retrieval", "recall_at_k"), ("captioning", "cider")])
def test_metric_default_follows_the_task(task, metric):
    spec = validate_spec_text(f"name: t\ntask: {task}\n", "t.yaml")
    assert spec["evaluate"]["metric"] == metric
    assert spec["data"]["source"] == "easy-vqa"  # easy-VQA serves every task


def test_every_task_of_the_schema_is_implemented():
    from evlm_cli.tasks import TASKS

    assert set(load_schema()["properties"]["task"]["enum"]) == set(TASKS)


# ---------------------------------------------------------------- the schema itself


def schema_properties(node, root, where="spec"):
    """Yield (dotted name, property schema) for every property, through $refs."""
    node = resolve_ref(node, root)
    for key, prop in node.get("properties", {}).items():
        yield f"{where}.{key}", resolve_ref(prop, root)
        yield from schema_properties(prop, root, f"{where}.{key}")


def test_every_schema_property_has_type_description_and_default():
    root = load_schema()
    found = list(schema_properties(root, root))
    assert len(found) > 100
    lacking = [name for name, prop in found
               if not {"type", "description", "default"} <= prop.keys() or not prop["description"]]
    assert lacking == []


def test_every_schema_object_refuses_unknown_keys():
    root = load_schema()
    objects = [("spec", root)] + [(n, p) for n, p in schema_properties(root, root)
                                  if p["type"] == "object"]
    assert [name for name, prop in objects if prop.get("additionalProperties") is not False] == []


def test_every_default_fits_its_own_property():
    root = load_schema()
    required = set(root["required"])
    misfits = []
    for name, prop in schema_properties(root, root):
        if name.removeprefix("spec.") in required:
            continue  # required keys have no usable default
        checked = {**prop, "$defs": root["$defs"]}
        if not jsonschema.Draft202012Validator(checked).is_valid(prop["default"]):
            misfits.append(name)
    assert misfits == []


def test_schema_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def test_schema_ships_in_the_package_and_the_top_level_link_shows_it():
    assert SCHEMA_PATH == ROOT / "evlm_cli" / "spec" / "spec.schema.json"
    link = ROOT / "schemas" / "spec.schema.json"
    assert link.is_symlink()
    assert os.readlink(link) == "../evlm_cli/spec/spec.schema.json"
    assert link.read_bytes() == SCHEMA_PATH.read_bytes()


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("value, expected", [
    ("bert-base-uncased", True),
    ("openai/clip-vit-base-patch16", True),
    ("./bert-base-uncased", False),
    ("/models/bert", False),
    ("models/bert/base", False),
    ("vit_small.pth", False),
    ("checkpoints/vit.safetensors", False),
])
def test_hub_id_heuristic(value, expected):
    assert looks_like_hub_id(value) is expected


def test_local_directory_with_a_hub_like_name_is_accepted(in_tmp_dir):
    local = in_tmp_dir / "bert-base-uncased"
    local.mkdir()
    config = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536,
              "num_hidden_layers": 6}
    (local / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = validate_spec_text("name: local\ntask: vqa\nteacher:\n  init:\n    text: bert-base-uncased\n",
                              "local.yaml")
    assert spec["teacher"]["init"]["text"] == "bert-base-uncased"
    assert spec["pairs"]["tokenizer"] == "bert-base-uncased"


def test_minilm_stays_a_name_and_finds_the_packaged_model_directory():
    spec = validate_spec_text("name: mini\ntask: vqa\nteacher:\n  init:\n    text: minilm\n", "mini.yaml")
    # params.yaml keeps the name, so shared-stage hashes are the same on every machine
    assert spec["teacher"]["init"]["text"] == spec["pairs"]["tokenizer"] == "minilm"
    directory = Path(local_path(spec["teacher"]["init"]["text"]))
    assert directory.is_absolute()
    assert directory == minilm_dir()
    assert (directory / "config.json").is_file()
    assert (directory / "vocab.txt").is_file()
    assert local_path("some/dir") == "some/dir" and local_path(None) is None


def test_explicit_tokenizer_is_kept_when_text_init_is_set(in_tmp_dir):
    (in_tmp_dir / "tok").mkdir()
    text = "name: mini\ntask: vqa\npairs:\n  tokenizer: tok\nteacher:\n  init:\n    text: minilm\n"
    spec = validate_spec_text(text, "mini.yaml")
    assert spec["pairs"]["tokenizer"] == "tok"


def test_tokenizer_stays_unset_without_text_init():
    # null then means: prepare_pairs trains a WordPiece on the captions
    assert validate_spec_text("name: x\ntask: vqa\n", "x.yaml")["pairs"]["tokenizer"] is None


def test_task_text_may_outgrow_the_pairs_when_the_text_encoder_is_imported():
    # the imported text encoder brings its own positions (MiniLM: 512)
    text = ("name: mini\ntask: vqa\npairs:\n  max_text_len: 32\ndata:\n  max_text_len: 64\n"
            "teacher:\n  init:\n    text: minilm\n")
    assert validate_spec_text(text, "mini.yaml")["data"]["max_text_len"] == 64


# ---------------------------------------------------------------- teacher checkpoints


def safetensors_bytes() -> bytes:
    header = b'{"__metadata__":{"format":"pt"}}'
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize("content, expected", [
    (safetensors_bytes(), True),
    (b"PK\x03\x04" + bytes(60), True),  # torch.save since 1.6: a zip archive
    (b"\x80\x02" + bytes(60), True),  # legacy torch.save: a pickle
    (b"[]\n", False),
    (b"", False),
    ((1000).to_bytes(8, "little") + b"{}", False),  # header longer than the file
    ((2).to_bytes(8, "little") + b"[]", False),
])
def test_checkpoint_sniffing(content, expected):
    assert (weights_format(content[:9], len(content)) is not None) is expected


def test_xvlm_checkpoint_files_are_accepted(in_tmp_dir):
    (in_tmp_dir / "a.safetensors").write_bytes(safetensors_bytes())
    (in_tmp_dir / "b.pth").write_bytes(b"PK\x03\x04" + bytes(60))
    (in_tmp_dir / "c.th").write_bytes(b"\x80\x02" + bytes(60))
    for name in ("a.safetensors", "b.pth", "c.th"):
        text = f"name: x\ntask: vqa\nteacher:\n  checkpoint_format: xvlm\n  checkpoint: {name}\n"
        assert validate_spec_text(text, "x.yaml")["teacher"]["checkpoint"] == name


def test_xvlm_checkpoint_directory_is_refused(in_tmp_dir):
    (in_tmp_dir / "model").mkdir()
    problems = problems_of_text("name: x\ntask: vqa\nteacher:\n  checkpoint_format: xvlm\n"
                                "  checkpoint: model\n")
    assert problems == ["x.yaml:5: teacher.checkpoint: 'model' is a directory (expected a "
                        "safetensors file or a torch .pth/.bin; an evlm directory needs "
                        "teacher.checkpoint_format: evlm)"]


def test_evlm_checkpoint_directory_is_accepted_and_a_file_refused(in_tmp_dir):
    (in_tmp_dir / "model").mkdir()
    (in_tmp_dir / "model" / "config.json").write_text("{}", encoding="utf-8")
    (in_tmp_dir / "model" / "model.safetensors").write_bytes(safetensors_bytes())
    (in_tmp_dir / "x.pth").write_bytes(b"PK\x03\x04" + bytes(60))
    spec = validate_spec_text("name: x\ntask: vqa\nteacher:\n  checkpoint: model\n", "x.yaml")
    assert spec["teacher"]["checkpoint"] == "model"
    problems = problems_of_text("name: x\ntask: vqa\nteacher:\n  checkpoint: x.pth\n")
    assert problems == ["x.yaml:4: teacher.checkpoint: 'x.pth' is not a directory (expected an "
                        "evlm checkpoint: a directory with config.json and model.safetensors; an "
                        "X-VLM file needs teacher.checkpoint_format: xvlm)"]


# ---------------------------------------------------------------- data sources


@pytest.mark.parametrize("train", [None, "", [], ()])
def test_absent_train_in_any_form_is_reported(train):
    assert source_problems("xvlm-json", "vqa", train, ["t.json"], "images", "answers.json") == [
        ("train", "required when the source is xvlm-json")]


def test_source_problems_name_fields_not_spec_keys():
    assert source_problems("easy-vqa", "vqa", None, None, None, None) == []
    for task in ("retrieval", "nlvr2", "captioning"):  # easy-VQA's derived data serves them
        assert source_problems("easy-vqa", task, None, None, None, None) == []
    assert source_problems("easy-vqa", "ocr", None, None, None, None) == [
        ("source", "easy-vqa has data for vqa, nlvr2, retrieval and captioning only; task ocr "
                   "needs xvlm-json")]
    assert source_problems("xvlm-json", "vqa", ("a.json",), "t.json", None, None) == [
        ("image_root", "required when the source is xvlm-json"),
        ("answer_list", "required for VQA from xvlm-json"),
    ]
    # only VQA needs an answer list
    assert source_problems("xvlm-json", "retrieval", "a.json", ["t.json"], "images", None) == []
    assert all("data." not in message
               for _, message in source_problems("xvlm-json", "vqa", None, None, None, None))


def test_export_without_its_packages_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    import evlm_cli.spec.rules as spec_module

    real = importlib.util.find_spec
    monkeypatch.setattr(spec_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntask: vqa\nexport:\n  opset: 17\n")
    with pytest.raises(InvalidSpecError) as error:
        load_spec(path)
    assert error.value.problems == [
        f"{path}:3: export: needs the package onnxruntime: pip install 'evlm[export]'"]


def test_captioning_without_java_is_refused_before_anything_runs(monkeypatch):
    import evlm_cli.spec.rules as spec_module

    monkeypatch.setattr(spec_module.shutil, "which", lambda name: None)
    with pytest.raises(InvalidSpecError) as error:
        validate_spec_text("name: caps\ntask: captioning\n", "caps.yaml")
    assert [str(p) for p in error.value.problems] == [
        "caps.yaml:2: task: captioning's metrics (pycocoevalcap's tokenizer and METEOR) need "
        "Java: put a JRE 8 or newer on PATH"]
    validate_spec_text("name: v\ntask: vqa\n", "v.yaml")  # other tasks do not need it
