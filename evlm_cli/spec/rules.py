"""The rules the schema cannot say, one function per rule, each named for what it checks.

A rule reads a spec the schema accepted, with its defaults filled, and yields (where, message)
for each breach: `where` is a key path, or a list of candidates of which the first written in
the spec is shown. The loader runs every rule in RULES and reports all they find together.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evlm_cli.core.catalogue import CATALOGUE
from evlm_cli.core.config import ENCODERS, PATH_KEYS
from evlm_cli.core.fileformat import WEIGHT_FILES, file_weights_format
from evlm_cli.core.layout import MODEL_FILES, RESERVED_NAMES, RUNS
from evlm_cli.core.packaged import EXPORT_INSTALL, EXPORT_PACKAGES, MINILM, local_path
from evlm_cli.data.sources import RENDERED_SOURCES, absent, source_problems
from evlm_cli.spec.words import JsonPath, Where, dotted, plural, quote, show

Problems = Iterator[tuple[Where, str]]

TRAINED_SECTIONS = ("pretrain", "distill", "task_teacher", "prune", "finetune")


def optional_pair_sections(spec: dict) -> list[str]:
    """The sections that train on the pairs and that `spec` may leave out: text assignment."""
    return ["text_assignment"] if spec.get("text_assignment") else []


def trained_sections(spec: dict) -> list[str]:
    """The sections of `spec` that train: TRAINED_SECTIONS, and text assignment where on."""
    return [*TRAINED_SECTIONS, *optional_pair_sections(spec)]
# Hub ids have no file suffix; a missing 'weights.pth' is a missing file, not a hub id.
FILE_SUFFIXES = (".json", ".txt", ".pt", ".pth", ".th", ".bin", ".safetensors", ".ckpt", ".npz")


# ---------------------------------------------------------------- names and tasks


def name_is_not_reserved(spec: dict) -> Problems:
    if spec["name"] in RESERVED_NAMES:
        yield ("name",), (f"name: {quote(spec['name'])} is reserved for the stages specs share; "
                          "pick another")


def metric_fits_task(spec: dict) -> Problems:
    metric, task = spec["evaluate"]["metric"], spec["task"]
    fitting = CATALOGUE[task].metrics
    if metric not in fitting:
        yield ([("evaluate", "metric"), ("task",)],
               f"evaluate.metric: {metric} does not fit task {task} (use {' or '.join(fitting)})")


def scoring_has_java(spec: dict) -> Problems:
    task = spec["task"]
    if CATALOGUE[task].needs_java and shutil.which("java") is None:
        yield ("task",), (f"task: {task}'s metrics (pycocoevalcap's tokenizer and METEOR) "
                          "need Java: put a JRE 8 or newer on PATH")


def task_is_exportable(spec: dict) -> Problems:
    task = spec["task"]
    if spec.get("export") is not None and not CATALOGUE[task].exportable:
        exportable = " and ".join(name for name, info in CATALOGUE.items() if info.exportable)
        yield ("export",), (f"export: the {task} task cannot be exported yet (only "
                            f"{exportable}'s single scoring graph is); set export: null")


def export_packages_are_installed(spec: dict) -> Problems:
    """Refused now, not after hours of training."""
    if spec.get("export") is None:
        return
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        yield (("export",), f"export: needs the package{'s' if len(missing) > 1 else ''} "
                            f"{' and '.join(missing)}: {EXPORT_INSTALL}")


def text_assignment_is_nlvr2s(spec: dict) -> Problems:
    task = spec["task"]
    if spec.get("text_assignment") is not None and task != "nlvr2":
        yield ("text_assignment",), (f"text_assignment: is NLVR2's domain pre-training, and task "
                                     f"{task} reads no pair of images; set text_assignment: null")


def answers_are_balanced_only_where_there_are_answers(spec: dict) -> Problems:
    """Pre-training and distillation read image-text pairs, and so does a task without answers
    (retrieval, captioning): they are sampled evenly."""
    sections = ["pretrain", "distill", *optional_pair_sections(spec)]
    if not CATALOGUE[spec["task"]].has_answers:
        sections += ["task_teacher", "prune", "finetune"]
    for section in sections:
        if spec[section]["train"]["answer_balance"]:
            yield (section, "train", "answer_balance"), (
                f"{section}.train.answer_balance: image-text pairs have no answers to balance; "
                "use 0")


# ---------------------------------------------------------------- model shapes


def student_is_no_deeper_than_teacher(spec: dict) -> Problems:
    student, teacher = spec["student"], spec["teacher"]
    for encoder in ENCODERS:
        kept, total = student[f"{encoder}_layers"], teacher[encoder]["layers"]
        if kept > total:
            yield ([("student", f"{encoder}_layers"), ("teacher", encoder, "layers")],
                   f"student.{encoder}_layers: {kept} is more than teacher.{encoder}.layers {total}")


def layer_map_picks_one_teacher_layer_per_student_layer(spec: dict) -> Problems:
    """Strictly increasing teacher layers, as many as the student has (a student deeper than
    its teacher is student_is_no_deeper_than_teacher's to report)."""
    student, teacher = spec["student"], spec["teacher"]
    for encoder in ENCODERS:
        kept, total = student[f"{encoder}_layers"], teacher[encoder]["layers"]
        layer_map = student["layer_map"][encoder]
        if layer_map is None or kept > total:
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


def heads_divide_width(spec: dict) -> Problems:
    teacher = spec["teacher"]
    for encoder in ENCODERS:
        width, heads = teacher[encoder]["width"], teacher[encoder]["heads"]
        if width % heads:
            yield ([("teacher", encoder, "width"), ("teacher", encoder, "heads")],
                   f"teacher.{encoder}.width: {width} is not a multiple of "
                   f"teacher.{encoder}.heads {heads}")


def teacher_from_scratch(teacher: dict) -> bool:
    """A teacher that imports no text weights: its position table has pairs.max_text_len rows.
    One that imports them keeps the table of its checkpoint, however long (BERT's 512); the
    import checks it against the data."""
    return teacher["init"]["text"] is None and teacher["checkpoint"] is None


def task_text_fits_teacher_positions(spec: dict) -> Problems:
    """A teacher trained from scratch has pairs.max_text_len text positions, no more."""
    pairs, data, teacher = spec["pairs"], spec["data"], spec["teacher"]
    if data["max_text_len"] > pairs["max_text_len"] and teacher_from_scratch(teacher):
        yield ([("data", "max_text_len"), ("pairs", "max_text_len")],
               f"data.max_text_len: {data['max_text_len']} is more than pairs.max_text_len "
               f"{pairs['max_text_len']}, the teacher's text positions")


def captions_fit_teacher_positions(spec: dict) -> Problems:
    pairs, teacher = spec["pairs"], spec["teacher"]
    max_len = spec["evaluate"]["max_len"]
    if (spec["task"] == "captioning" and max_len is not None and max_len >= pairs["max_text_len"]
            and teacher_from_scratch(teacher)):
        # A caption of max_len tokens follows its begin token: max_len + 1 positions.
        yield ([("evaluate", "max_len"), ("pairs", "max_text_len")],
               f"evaluate.max_len: {max_len} tokens after the begin token need more than "
               f"pairs.max_text_len {pairs['max_text_len']}, the teacher's text positions")


def patches_tile_images(spec: dict) -> Problems:
    """A task at another image size than the pairs resamples the pre-trained positions to its
    own patch grid, so each size needs whole patches."""
    patch = spec["teacher"]["vision"]["patch_size"]
    for section in ("data", "pairs"):
        size = spec[section]["image_size"]
        if size % patch:
            yield ([("teacher", "vision", "patch_size"), (section, "image_size")],
                   f"teacher.vision.patch_size: {patch} does not divide {section}.image_size "
                   f"{size}")


def fusion_from_text_has_a_text_init(spec: dict) -> Problems:
    init = spec["teacher"]["init"]
    if init["fusion_from_text"] and init["text"] is None:
        yield (("teacher", "init", "fusion_from_text"),
               "teacher.init.fusion_from_text: needs teacher.init.text")


def fusion_from_text_has_the_text_shape(spec: dict) -> Problems:
    teacher = spec["teacher"]
    if not teacher["init"]["fusion_from_text"]:
        return
    for key in ("width", "heads", "ffn"):
        if teacher["fusion"][key] != teacher["text"][key]:
            yield (("teacher", "fusion", key),
                   f"teacher.fusion.{key}: {teacher['fusion'][key]} must equal teacher.text.{key} "
                   f"{teacher['text'][key]} when teacher.init.fusion_from_text is true")


def imported_bert_encoders_are_post_norm(spec: dict) -> Problems:
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


def text_shape_matches_text_init(spec: dict) -> Problems:
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


# transformers CLIP config keys of the vision tower, by the teacher.vision key each must equal.
CLIP_VISION_KEYS = {"width": "hidden_size", "heads": "num_attention_heads",
                    "ffn": "intermediate_size", "layers": "num_hidden_layers",
                    "patch_size": "patch_size"}
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def vision_init_fits_the_teacher(spec: dict) -> Problems:
    """teacher.init.vision is a weights file, or a transformers CLIP directory whose vision
    tower has teacher.vision's shape; either holds a patch convolution, which a conv stem
    cannot load."""
    teacher = spec["teacher"]
    value, where = teacher["init"]["vision"], ("teacher", "init", "vision")
    if value is None:
        return
    if teacher["vision"]["stem"] != "patch":
        yield (("teacher", "vision", "stem"),
               f"teacher.vision.stem: {teacher['vision']['stem']} cannot load the patch "
               "convolution of teacher.init.vision; use patch")
    if not path_exists(value):
        return  # paths_exist_locally's to report
    directory = Path(value)
    if not directory.is_dir():
        yield from checkpoint_problems(where, value, "xvlm")  # a weights file, as X-VLM's are
        return
    expected = "expected a transformers CLIP directory: config.json and " + " or ".join(CLIP_WEIGHTS)
    if not (directory / "config.json").is_file() or not any(
            (directory / name).is_file() for name in CLIP_WEIGHTS):
        yield where, f"teacher.init.vision: {quote(value)} lacks config.json or weights ({expected})"
        return
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        yield where, f"teacher.init.vision: cannot read {directory / 'config.json'}: {error}"
        return
    model_type = config.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        yield where, (f"teacher.init.vision: model_type {quote(str(model_type))} of {quote(value)} "
                      f"is not a transformers CLIP model (expected clip or clip_vision_model)")
        return
    vision = (config.get("vision_config") or {}) if model_type == "clip" else config
    for key, config_key in CLIP_VISION_KEYS.items():
        if config_key in vision and teacher["vision"][key] != vision[config_key]:
            yield (("teacher", "vision", key),
                   f"teacher.vision.{key}: {teacher['vision'][key]} does not match {config_key} "
                   f"{vision[config_key]} of teacher.init.vision")


# ---------------------------------------------------------------- pruning


def min_keep_fits_the_target(spec: dict) -> Problems:
    prune = spec["prune"]
    if prune["mode"] == "modal-adaptive" and prune["min_keep"] > 1 - prune["target_sparsity"] + 1e-9:
        yield [("prune", "min_keep"), ("prune", "target_sparsity")], (
            f"prune.min_keep: {prune['min_keep']:g} is more than 1 - target_sparsity = "
            f"{1 - prune['target_sparsity']:g}; no encoder could keep that much")


def prune_units_prune_something(spec: dict) -> Problems:
    units = spec["prune"]["units"]
    if "heads" not in units and "ffn" not in units:
        yield ("prune", "units"), "prune.units: needs heads or ffn (layers alone prune nothing)"
    elif "layers" in units and not {"heads", "ffn"} <= set(units):
        yield ("prune", "units"), ("prune.units: layers needs both heads and ffn (a sublayer "
                                   "gate's cost is the units it covers)")


# ---------------------------------------------------------------- resources and images


def batches_split_over_processes(spec: dict) -> Problems:
    processes, nodes = spec["resources"]["processes"], spec["resources"]["nodes"]
    world = processes * nodes
    over = (f"resources.processes = {processes}" if nodes == 1 else
            f"resources.nodes x resources.processes = {nodes} x {processes}")
    for section in trained_sections(spec):
        size = spec[section]["train"]["batch_size"]
        if size % world:
            yield ("resources", "processes"), (
                f"{section}.train.batch_size: {size} does not split evenly over {over} "
                "(it is the global batch)")


def crop_scale_is_a_range(spec: dict) -> Problems:
    crop = spec["augment"]["crop_scale"]
    if crop is not None and crop[0] > crop[1]:
        yield ("augment", "crop_scale"), (f"augment.crop_scale: [{crop[0]:g}, {crop[1]:g}] is "
                                          "not a range (low first)")


def rendered_images_are_not_read_from_files(spec: dict) -> Problems:
    source = spec["data"]["source"]
    if source in RENDERED_SOURCES and spec["data"]["storage"] == "files":
        yield ("data", "storage"), (f"data.storage: {source} renders its images into a "
                                    "temporary folder, so they cannot be read from files later; "
                                    "use auto or memory")


# ---------------------------------------------------------------- data and files


def data_source_has_what_it_needs(spec: dict) -> Problems:
    """What the task's data source needs (evlm_cli.data.sources), at the field or the source."""
    data = spec["data"]
    for field, message in source_problems(data["source"], spec["task"], data["train"],
                                          data["test"], data["image_root"], data["answer_list"]):
        # A missing field has no line: the source that needs it is where the problem is.
        yield [("data", field), ("data", "source"), ("task",)], f"data.{field}: {message}"


def pair_source_has_what_it_needs(spec: dict) -> Problems:
    pairs = spec["pairs"]
    if pairs["source"] == "xvlm-json":
        for field in ("train", "image_root"):
            if absent(pairs[field]):
                yield ([("pairs", field), ("pairs", "source")],
                       f"pairs.{field}: required when the source is xvlm-json")


def paths_exist_locally(spec: dict) -> Problems:
    """Every path key names an existing file (evlm never downloads: a hub id is refused)."""
    for path_key in PATH_KEYS:
        where, kind = path_key.key, path_key.names
        value = lookup(spec, where)
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if item is None or (path_key.may_be_packaged and item == MINILM) or path_exists(item):
                continue
            item_where = where + (index,) if isinstance(value, list) else where
            name = dotted(item_where)
            if path_key.may_be_hub_id and looks_like_hub_id(item):
                yield item_where, (f"{name}: {quote(item)} looks like a model-hub id; evlm never "
                                   f"downloads: pass a local {kind} instead")
            else:
                yield item_where, f"{name}: {kind} {quote(item)} does not exist"


def xvlm_checkpoints_keep_the_mlp_itm_head(spec: dict) -> Problems:
    """X-VLM's itm_head is an MLP; a one-Linear head has no place for its tensors."""
    teacher = spec["teacher"]
    if (teacher["itm_head"] == "linear" and teacher["checkpoint"] is not None
            and teacher["checkpoint_format"] == "xvlm"):
        yield [("teacher", "itm_head"), ("teacher", "checkpoint")], (
            "teacher.itm_head: linear cannot take an X-VLM checkpoint's itm_head (an MLP); "
            "use mlp")


def image_roots_hold_no_outputs(spec: dict) -> Problems:
    """A relative image root is a DVC dependency of prepare, and DVC refuses a dependency
    that contains the stage outputs (the project folder, or one above it, holds runs/)."""
    project = Path.cwd().resolve()
    for where in (("data", "image_root"), ("pairs", "image_root")):
        value = lookup(spec, where)
        if value is None or Path(value).is_absolute():
            continue
        root = Path(value).resolve()
        if root == project or root in project.parents:
            yield where, (f"{dotted(where)}: {quote(value)} holds this project's outputs "
                          f"({RUNS}/), which DVC cannot track as an input; keep the images in "
                          "a folder of their own (e.g. images/) and name that folder here")


def checkpoints_look_like_their_format(spec: dict) -> Problems:
    """An existing checkpoint must look like one of its format, by its first bytes only.

    evlm: a directory with config.json and model.safetensors; xvlm: a safetensors file, a torch
    zip checkpoint or a legacy torch pickle, as each section's checkpoint_format says. (A
    missing one is paths_exist_locally's to report.)
    """
    for section in ("teacher", "task_teacher"):
        yield from checkpoint_problems((section, "checkpoint"), spec[section]["checkpoint"],
                                       spec[section]["checkpoint_format"])


def checkpoint_problems(where: JsonPath, value: str | None, fmt: str) -> Problems:
    if value is None or not path_exists(value):
        return
    name, path = dotted(where), Path(value)
    if fmt == "evlm":
        expected = ("expected an evlm checkpoint: a directory with config.json and "
                    "model.safetensors")
        if not path.is_dir():
            hint = f"; an X-VLM file needs {where[0]}.checkpoint_format: xvlm"
            yield where, f"{name}: {quote(value)} is not a directory ({expected}{hint})"
            return
        missing = [file for file in MODEL_FILES if not (path / file).is_file()]
        if missing:
            yield where, f"{name}: {quote(value)} has no {' or '.join(missing)} ({expected})"
        return
    expected = f"expected {WEIGHT_FILES}"
    if path.is_dir():
        yield where, (f"{name}: {quote(value)} is a directory ({expected}; an evlm "
                      f"directory needs {where[0]}.checkpoint_format: evlm)")
        return
    try:
        found = file_weights_format(path)
    except OSError as error:
        yield where, f"{name}: cannot read {quote(value)}: {error.strerror or error}"
        return
    if found is None:
        yield where, f"{name}: {quote(value)} is not a checkpoint ({expected})"


def path_exists(value: str) -> bool:
    try:
        return Path(value).exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte: no such file either way
        return False


def looks_like_hub_id(value: str) -> bool:
    """'bert-base-uncased' or 'openai/clip-vit-base-patch16', not './x', '/x' or 'a/b/c'."""
    if value.startswith((".", "/", "~")) or "\\" in value or value.lower().endswith(FILE_SUFFIXES):
        return False
    return value.count("/") <= 1


def lookup(spec: dict, where: JsonPath) -> Any:
    for key in where:
        spec = spec[key]
    return spec


RULES: list[Callable[[dict], Problems]] = [
    name_is_not_reserved,
    metric_fits_task,
    scoring_has_java,
    task_is_exportable,
    text_assignment_is_nlvr2s,
    export_packages_are_installed,
    answers_are_balanced_only_where_there_are_answers,
    student_is_no_deeper_than_teacher,
    layer_map_picks_one_teacher_layer_per_student_layer,
    heads_divide_width,
    task_text_fits_teacher_positions,
    captions_fit_teacher_positions,
    patches_tile_images,
    fusion_from_text_has_a_text_init,
    fusion_from_text_has_the_text_shape,
    imported_bert_encoders_are_post_norm,
    text_shape_matches_text_init,
    vision_init_fits_the_teacher,
    min_keep_fits_the_target,
    prune_units_prune_something,
    batches_split_over_processes,
    crop_scale_is_a_range,
    rendered_images_are_not_read_from_files,
    data_source_has_what_it_needs,
    pair_source_has_what_it_needs,
    paths_exist_locally,
    image_roots_hold_no_outputs,
    xvlm_checkpoints_keep_the_mlp_itm_head,
    checkpoints_look_like_their_format,
]


def rule_problems(spec: dict) -> list[tuple[Where, str]]:
    """What every rule finds in `spec`."""
    return [problem for rule in RULES for problem in rule(spec)]
