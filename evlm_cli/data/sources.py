"""What each data source needs from the data config; the spec loader and prepare share it."""

from __future__ import annotations

SOURCES = ("easy-vqa", "easy-vqa-mosaic", "xvlm-json")
# Pre-training pairs come from easy-VQA's captions or from files; mosaics have no captions.
PAIR_SOURCES = ("easy-vqa", "xvlm-json")
# Sources that render their images into a scratch folder, gone once prepare ends: their pixels
# must be kept in memory (storage files cannot serve them).
RENDERED_SOURCES = ("easy-vqa-mosaic",)
# Its questions, and captions (`data.captions`) and statements about image pairs
# (`data.nlvr2`) derived from its images.
EASY_VQA_TASKS = ("vqa", "nlvr2", "retrieval", "captioning")


def source_problems(source: str, task: str, train, test, image_root,
                    answer_list) -> list[tuple[str, str]]:
    """(data-config field, message) for each thing `source` needs for `task` and lacks.

    `train` and `test` may be None, one path or a list/tuple of paths; empty means absent.
    Messages name no spec keys: the caller prefixes the field as it calls it.
    """
    if source == "easy-vqa-mosaic":
        if task != "vqa":
            return [("source", f"easy-vqa-mosaic has VQA questions only, not task {task}")]
        return []
    if source == "easy-vqa":
        if task not in EASY_VQA_TASKS:
            return [("source", f"easy-vqa has data for {_listed(EASY_VQA_TASKS)} only; "
                               f"task {task} needs xvlm-json")]
        return []
    if source != "xvlm-json":
        return [("source", f"unknown source {source!r} (expected one of: {', '.join(SOURCES)})")]
    # Every task reads train and test files of images under image_root.
    problems = [(field, "required when the source is xvlm-json")
                for field, value in (("train", train), ("test", test), ("image_root", image_root))
                if absent(value)]
    if task == "vqa" and absent(answer_list):
        problems.append(("answer_list", "required for VQA from xvlm-json"))
    return problems


def absent(value) -> bool:
    """None, an empty string or an empty list/tuple: nothing given."""
    if isinstance(value, list | tuple):
        return not value
    return value is None or value == ""


def _listed(names: tuple[str, ...]) -> str:
    """The names as prose lists them: a; a and b; a, b and c."""
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))
