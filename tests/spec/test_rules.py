"""The domain rules: one function per rule, each broken by a bad spec that expects its line."""

from pathlib import Path

import pytest

import evlm_cli.spec.rules as rules
from evlm_cli.spec.load import InvalidSpecError, load_spec

BAD = Path(__file__).resolve().parents[1] / "specs" / "bad"
# Broken only on a machine without something installed: tests/test_spec.py takes it away.
NEEDS_A_MISSING_TOOL = {"scoring_has_java", "export_packages_are_installed"}


def test_every_rule_is_broken_by_a_bad_spec(monkeypatch):
    broken = set()

    def recording(rule):
        def run(spec):
            found = list(rule(spec))
            if found:
                broken.add(rule.__name__)
            return found
        return run

    monkeypatch.setattr(rules, "RULES", [recording(rule) for rule in rules.RULES])
    monkeypatch.chdir(BAD.parent)
    for spec_file in sorted(BAD.glob("*.yaml")):
        try:
            load_spec(f"bad/{spec_file.name}")
        except InvalidSpecError:
            pass
    assert set(ALL_RULES) - NEEDS_A_MISSING_TOOL - broken == set()


ALL_RULES = [rule.__name__ for rule in rules.RULES]


def test_rules_have_distinct_names_that_say_what_they_check():
    assert len(set(ALL_RULES)) == len(ALL_RULES)
    assert all(not name.endswith("_problems") for name in ALL_RULES)


@pytest.mark.parametrize("name", ALL_RULES)
def test_a_rule_yields_nothing_for_the_default_spec(name):
    spec = load_spec(Path(__file__).resolve().parents[2] / "specs" / "vqa_50pct.yaml")
    assert list(getattr(rules, name)(spec)) == []


@pytest.mark.parametrize("teacher, refused", [
    ({}, True),  # from scratch: pairs.max_text_len rows, no more
    ({"checkpoint": "teacher.pth", "checkpoint_format": "xvlm"}, False),  # its own table
    ({"init": {"text": "bert", "vision": None, "fusion_from_text": False, "lr_scale": 0.1}},
     False),
])
def test_only_a_teacher_from_scratch_bounds_the_task_text_by_the_pairs(teacher, refused):
    """A teacher that imports its text side keeps the checkpoint's position table (BERT's 512),
    which the import checks against the data, so the spec does not refuse it."""
    spec = load_spec(Path(__file__).resolve().parents[2] / "specs" / "vqa_50pct.yaml")
    spec["teacher"].update(teacher)
    spec["data"]["max_text_len"] = spec["pairs"]["max_text_len"] + 16
    spec["evaluate"]["max_len"] = spec["pairs"]["max_text_len"]
    for rule in (rules.task_text_fits_teacher_positions, rules.captions_fit_teacher_positions):
        spec["task"] = "captioning" if rule is rules.captions_fit_teacher_positions else "vqa"
        assert bool(list(rule(spec))) is refused, rule.__name__
