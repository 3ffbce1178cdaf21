"""Seeds: one run per seed, shared upstream stages, and mean ± std in diff, show and the summary."""

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from evlm_cli.cli.main import main
from evlm_cli.pipeline.compile import compile_specs, plan
from evlm_cli.report.diff import diff_rows
from evlm_cli.report.runs import SeedGroup, load_runs
from evlm_cli.report.seeds import mean_std
from evlm_cli.report.summary import group_table
from evlm_cli.spec.load import seed_runs
from tests.helpers.project import stages_of, tiny
from tests.helpers.runs import SEED_VALUES, three_seeds  # noqa: F401  (a fixture)

UPSTREAM = ("prepare_pairs", "teacher_pretrain", "distill", "prepare", "teacher", "teacher_eval")


def names_by_kind(spec):
    return {s.kind.name: s.name for s in plan(spec)}


def test_seeds_share_the_teacher_and_student_and_vary_pruning_on():
    runs = seed_runs(tiny(seed=5), [0, 1, 2])
    assert [r["name"] for r in runs] == ["tiny_vqa-s0", "tiny_vqa-s1", "tiny_vqa-s2"]
    assert [r["seed"] for r in runs] == [0, 1, 2]
    assert {r["shared_seed"] for r in runs} == {5} and {r["seeds"] is None for r in runs} == {True}
    planned = [names_by_kind(r) for r in runs]
    for kind in UPSTREAM:  # one stage for all three, the one the spec alone would run
        assert {p[kind] for p in planned} == {names_by_kind(tiny(seed=5))[kind]}
    assert [p["prune"] for p in planned] == [f"tiny_vqa-s{s}-prune" for s in (0, 1, 2)]
    shared_params = next(s for s in plan(runs[1]) if s.kind.name == "teacher").params
    own_params = next(s for s in plan(runs[1]) if s.kind.name == "prune").params
    assert shared_params["seed"] == 5 and own_params["seed"] == 1


def test_seed_scope_all_varies_every_stage():
    runs = seed_runs(tiny(seed_scope="all"), [0, 1])
    assert {r["shared_seed"] for r in runs} == {None}
    planned = [names_by_kind(r) for r in runs]
    assert planned[0]["teacher"] != planned[1]["teacher"]
    assert planned[0]["distill"] != planned[1]["distill"]
    # seed 0 under scope all is the spec's own run upstream
    assert planned[0]["teacher"] == names_by_kind(tiny(seed=0))["teacher"]


def test_the_specs_own_seeds_list_and_the_override():
    assert [r["name"] for r in seed_runs(tiny(seeds=[3, 4]))] == ["tiny_vqa-s3", "tiny_vqa-s4"]
    assert [r["name"] for r in seed_runs(tiny(seeds=[3, 4]), [7])] == ["tiny_vqa-s7"]
    assert seed_runs(tiny()) == [tiny()]


def test_compile_with_seeds_writes_one_set_of_shared_stages(tmp_path):
    compile_specs(seed_runs(tiny(), [0, 1]), tmp_path)
    stages = stages_of(tmp_path)
    own = sorted(name for name in stages if not name.startswith("shared-"))
    assert own == sorted(f"tiny_vqa-s{s}-{k}" for s in (0, 1)
                         for k in ("prune", "finetune", "export", "evaluate")
                         if k != "export" or tiny()["export"] is not None)
    assert sum(name.startswith("shared-teacher-") for name in stages) == 1
    params = yaml.safe_load((tmp_path / "runs/tiny_vqa-s1/params.yaml").read_text())
    assert params["seed"] == 1 and params["shared_seed"] == 0


def test_mean_and_std_equal_a_hand_computation():
    mean, std = mean_std(list(SEED_VALUES))
    assert mean == pytest.approx(0.93)
    # sample standard deviation: deviations -0.03, -0.01, 0.04 over n - 1 = 2
    assert std == pytest.approx(math.sqrt((0.03 ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([0.5, None]) is None


def test_diff_aggregates_a_group_of_seeds_and_shows_each_seed(three_seeds):  # noqa: F811
    group = load_runs("a")
    assert isinstance(group, SeedGroup) and group.seeds == [0, 1, 2]
    assert [r.name for r in group.runs] == ["a-s0", "a-s1", "a-s2"]
    header, rows = diff_rows([group, load_runs("b")])
    assert header == ["", "a (mean ± std, n=3)", "a-s0", "a-s1", "a-s2", "b"]
    by_label = {row[0]: row[1:] for row in rows}
    assert by_label["vqa_accuracy"] == ["0.93 ± 0.03606", "0.9", "0.92", "0.97", "0.9"]
    assert by_label["speedup batch 1"] == ["3 ± 1", "2", "3", "4", "2"]
    assert by_label["seed"][0] == "0,1,2"
    out = CliRunner().invoke(main, ["diff", "a", "b", "--format", "json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["a"]["seeds"] == ["a-s0", "a-s1", "a-s2"]
    assert shown["a"]["mean_std"]["vqa_accuracy"]["mean"] == pytest.approx(0.93)
    assert shown["a"]["runs"]["a-s2"]["metrics"]["student"]["score"]["value"] == 0.97


def test_the_group_summary_says_what_the_seeds_varied(three_seeds):  # noqa: F811
    text = group_table(load_runs("a"))
    assert text.splitlines()[0] == "a: 3 seeds (0, 1, 2), vqa, modal-adaptive pruning to 50%"
    assert "the teachers and the distilled student are shared" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("vqa_accuracy"))
    assert row.split()[1:] == ["0.93", "±", "0.03606", "0.9", "0.92", "0.97"]


@pytest.mark.parametrize("seeds, message", [
    ("0,x", "--seeds 0,x: expected comma-separated integers"),
    ("1,1", "--seeds 1,1: the seeds must be distinct and not negative"),
    ("-1", "--seeds -1: the seeds must be distinct and not negative"),
])
def test_bad_seeds_option_is_a_clear_error(in_tmp_dir, seeds, message):
    result = CliRunner().invoke(main, ["compile", "--seeds", seeds, "any.yaml"])
    assert result.exit_code == 2
    assert message in result.output
