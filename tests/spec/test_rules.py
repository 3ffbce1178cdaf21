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
