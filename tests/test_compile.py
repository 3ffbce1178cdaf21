"""The compiler: stage names, params keys, code deps, sharing between specs, stale stages."""

import json
import shlex
import subprocess

import pytest
import yaml

from evlm_cli.pipeline.compile import compile_specs, plan
from evlm_cli.pipeline.registry import KINDS
from tests.helpers.project import stages_of, tiny


def test_stage_names_params_and_deps(tmp_path):
    compile_specs([tiny()], tmp_path)
    stages = stages_of(tmp_path)
    kinds = sorted(name.split("-")[1] if name.startswith("shared-") else name.split("-")[-1]
                   for name in stages)
    assert kinds == sorted(k for k in KINDS if k != "text_assignment")  # NLVR2's only
    prune = stages["tiny_vqa-prune"]
    assert prune["params"] == [{"runs/tiny_vqa/params.yaml": ["seed", "task", "device",
                                                              "precision", "augment", "prune"]}]
    assert set(KINDS["prune"].sections) == {"seed", "task", "device", "precision", "resources",
                                            "augment", "prune"}
    # each stage depends on its kind's code fingerprint, not on paths into a checkout
    assert prune["deps"][0] == ".evlm/code/prune.json"
    assert not any(d.startswith(("evlm_cli", "stages")) for v in stages.values() for d in v["deps"])
    teacher = next(v for k, v in stages.items() if k.startswith("shared-teacher-"))
    code = {k: json.loads((tmp_path / ".evlm/code" / f"{k}.json").read_text())["modules"]
            for k in ("prune", "teacher")}
    assert "evlm_cli.compress.l0" in code["prune"]
    assert "evlm_cli.compress.l0" not in code["teacher"]  # pruning code never reruns the teacher
    assert teacher["deps"][0] == ".evlm/code/teacher.json"
    # resume checkpoints stay out of git in a user's project; the fingerprints may go in
    assert (tmp_path / ".evlm/.gitignore").read_text() == "work/\nproject.lock\n"
    assert prune["metrics"] == [{"runs/tiny_vqa/prune/masks.json": {"cache": False}}]
    assert stages["tiny_vqa-evaluate"]["metrics"] == [
        {"runs/tiny_vqa/evaluate/metrics.json": {"cache": False}}]
    # the resolved params are written, and a shared stage's file holds only the keys it reads
    params = yaml.safe_load((tmp_path / "runs/tiny_vqa/params.yaml").read_text())
    assert params["prune"]["target_sparsity"] == 0.5
    shared_file = next(iter(teacher["params"][0]))
    assert set(yaml.safe_load((tmp_path / shared_file).read_text())) == {
        "seed", "task", "device", "precision", "resources", "augment", "task_teacher"}


SHARED = ["prepare_pairs", "teacher_pretrain", "distill", "prepare", "teacher", "teacher_eval"]


def test_nlvr2s_teacher_starts_from_text_assignment_where_the_spec_asks_and_is_another_stage():
    plain = tiny("pairs", **{"task": "nlvr2", "evaluate.metric": "nlvr2_accuracy",
                             "export": None})
    assigned = {**plain, "name": "assigned", "text_assignment": {
        "lr_scale": 0.5, "hard_negatives": 0.5, "train": plain["pretrain"]["train"]}}
    before, after = ({s.kind.name: s for s in plan(spec)} for spec in (plain, assigned))
    assert "text_assignment" not in before
    stage = after["text_assignment"]
    assert stage.inputs == {"pairs": after["prepare_pairs"].outputs["data"],
                            "pretrained": after["teacher_pretrain"].outputs["model"]}
    assert after["teacher"].inputs["assigned"] == stage.outputs["model"]
    assert "assigned" not in before["teacher"].inputs
    # the same task_teacher settings, but another starting point: another teacher stage
    assert after["teacher"].name != before["teacher"].name
    assert after["teacher_pretrain"].name == before["teacher_pretrain"].name


def names(spec) -> dict[str, str]:
    return {s.kind.name: s.name for s in plan(spec)}


def test_specs_differing_downstream_share_upstream_stages(tmp_path):
    a, b = names(tiny("a")), names(tiny("b", **{"prune.target_sparsity": 0.3}))
    assert all(a[k] == b[k] for k in SHARED) and a["prune"] != b["prune"]
    c = names(tiny("c", **{"distill.temperature": 4.0}))
    assert [k for k in SHARED if c[k] != a[k]] == ["distill"]
    # the task teacher's recipe changes the task's stages only, never the shared pre-training
    d = names(tiny("d", **{"task_teacher.train.lr": 0.01}))
    assert [k for k in SHARED if d[k] != a[k]] == ["teacher", "teacher_eval"]
    # the teacher's shape changes everything the teacher feeds
    f = names(tiny("f", **{"pretrain.train.lr": 0.01}))
    assert [k for k in SHARED if f[k] != a[k]] == ["teacher_pretrain", "distill", "teacher",
                                                   "teacher_eval"]
    # another task shares the task-agnostic stages and nothing else
    g = names(tiny("g", task="retrieval", **{"evaluate.metric": "recall_at_k", "export": None,
                                             "task_teacher.train.answer_balance": 0}))
    assert [k for k in SHARED if g[k] == a[k]] == ["prepare_pairs", "teacher_pretrain", "distill"]
    # the thread count changes how fast a stage runs, not what it computes: nothing reruns
    e = plan(tiny("e", **{"resources.threads": 7}))
    assert {s.kind.name: s.name for s in e} == names(tiny("a")) | {
        k: v.replace("a-", "e-", 1) for k, v in names(tiny("a")).items() if v.startswith("a-")}
    assert e[1].params["resources"]["threads"] == 7  # the stage still reads it


def test_the_dense_baseline_is_shared_by_targets_and_seeds_and_follows_its_settings():
    a = {s.kind.name: s for s in plan(tiny("a"))}
    assert a["dense"].name.startswith("shared-dense-")
    assert a["evaluate"].inputs["dense_model"] == a["dense"].outputs["model"]
    assert a["dense"].inputs["student"] == a["distill"].outputs["model"]
    # another target, and another seed of the same spec, reuse it
    assert names(tiny("b", **{"prune.target_sparsity": 0.3}))["dense"] == a["dense"].name
    assert names(tiny("s", seed=3, shared_seed=0))["dense"] == a["dense"].name
    # it trains with finetune's optimiser, for its own epochs and with its own loss weights:
    # any of them retrains it alone
    for change in ({"finetune.train.lr": 0.01}, {"dense.epochs": 3},
                   {"dense.weights.hidden": 0.0}):
        other = names(tiny("c", **change))
        assert other["dense"] != a["dense"].name and other["teacher"] == a["teacher"].name
    # dense: null: no stage, and evaluate times the untrained dense student without scoring it
    none = {s.kind.name: s for s in plan(tiny("n", dense=None))}
    assert "dense" not in none and "dense_model" not in none["evaluate"].inputs


def test_compiling_keeps_other_specs_and_prunes_stale_stages(tmp_path):
    compile_specs([tiny("a"), tiny("b")], tmp_path)
    first = stages_of(tmp_path)
    assert sum(k.startswith("shared-") for k in first) == 7  # one upstream chain for both
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        k: {"cmd": "x"} for k in first}}))
    # b changes its distillation: a new distill stage; a's stays because a still uses it
    compile_specs([tiny("b", **{"distill.temperature": 4.0})], tmp_path)
    second = stages_of(tmp_path)
    assert {k for k in second if k.startswith("a-")} == {"a-prune", "a-finetune", "a-export",
                                                         "a-evaluate"}
    assert sum(k.startswith("shared-distill-") for k in second) == 2
    # a changes too: the old distill stage is now used by nobody and is pruned, from the lock too
    compile_specs([tiny("a", **{"distill.temperature": 4.0})], tmp_path)
    third = stages_of(tmp_path)
    assert sum(k.startswith("shared-distill-") for k in third) == 1
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert set(lock) <= set(third) and not set(first) - set(third) & set(lock)


def test_commands_quote_paths_and_never_interpolate_into_a_shell(tmp_path):
    compile_specs([tiny()], tmp_path)
    cmd = stages_of(tmp_path)["tiny_vqa-prune"]["cmd"]
    assert cmd.startswith("evlm stage prune --params runs/tiny_vqa/params.yaml ")
    assert ";" not in cmd and "$" not in cmd


def test_files_the_spec_names_are_deps_of_the_stages_that_read_them(tmp_path):
    spec = tiny()
    spec["teacher"]["checkpoint"] = "models/teacher"
    spec["task_teacher"]["checkpoint"] = "models/task_teacher"
    spec["pairs"]["tokenizer"] = "/opt/site-packages/minilm"  # installed, not edited: no dep
    stages = {s.kind.name: s.to_dvc() for s in plan(spec)}
    assert "models/teacher" in stages["teacher_pretrain"]["deps"]
    assert "models/task_teacher" in stages["teacher"]["deps"]
    assert "models/teacher" not in stages["teacher"]["deps"]
    assert "models/teacher" not in stages["prepare"]["deps"]
    assert not any(d.startswith("/") for s in stages.values() for d in s["deps"])
    spec["teacher"]["init"]["text"] = spec["pairs"]["tokenizer"] = "minilm"  # packaged: no dep
    assert not any("minilm" in d for s in plan(spec) for d in s.to_dvc()["deps"])


def test_export_is_a_stage_only_when_the_spec_asks_and_evaluate_then_reads_it():
    with_export = {s.kind.name: s.to_dvc() for s in plan(tiny())}
    assert "--onnx runs/tiny_vqa/export/onnx" in with_export["evaluate"]["cmd"]
    assert "runs/tiny_vqa/export/onnx" in with_export["evaluate"]["deps"]
    assert with_export["export"]["outs"] == ["runs/tiny_vqa/export/onnx"]
    assert with_export["export"]["params"] == [{"runs/tiny_vqa/params.yaml": ["task", "export"]}]
    without = {s.kind.name: s.to_dvc() for s in plan(tiny(export=None))}
    assert "export" not in without and "--onnx" not in without["evaluate"]["cmd"]


HOSTILE = "$(touch pwned) `touch pwned2`; touch pwned3 'q\" *"


@pytest.mark.e2e
def test_hostile_paths_never_reach_a_shell(tmp_path):
    """Spec paths with shell syntax, in a project folder named with it: every stage command,
    run by /bin/sh as DVC runs it, passes exactly its arguments and executes nothing else."""
    root = tmp_path / HOSTILE
    root.mkdir()
    spec = tiny(**{"data.source": "xvlm-json", "data.train": [f"ann/{HOSTILE}.json"],
                   "data.test": [f"ann/{HOSTILE}-test.json"], "data.image_root": f"img/{HOSTILE}",
                   "data.answer_list": f"{HOSTILE}.json"})
    compile_specs([spec], root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "evlm"
    fake.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    fake.chmod(0o755)
    stages = stages_of(root)
    assert any(f"ann/{HOSTILE}.json" in v["deps"] for v in stages.values())  # the paths are deps
    for name, stage in stages.items():
        # Spec strings reach a stage through its params file, never through its command.
        assert "touch" not in stage["cmd"] and str(root) not in stage["cmd"], name
        ran = subprocess.run(["/bin/sh", "-c", stage["cmd"]], cwd=root, capture_output=True,
                             text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=True)
        assert json.loads(ran.stdout) == shlex.split(stage["cmd"])[1:], name
    assert not list(tmp_path.rglob("pwned*"))


def test_each_runs_curves_are_top_level_dvc_plots(tmp_path):
    compile_specs([tiny(), tiny("other")], tmp_path)
    plots = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["plots"]
    by_id = {next(iter(p)): next(iter(p.values())) for p in plots}
    assert set(by_id) == {f"{run}: {title}" for run in ("tiny_vqa", "other")
                          for title in ("training loss", "expected vs target sparsity")}
    loss = by_id["other: training loss"]
    assert loss["x"] == "step" and loss["y"] == {"runs/other/prune/log.csv": ["loss"],
                                                 "runs/other/finetune/log.csv": ["loss"]}
    assert by_id["tiny_vqa: expected vs target sparsity"]["y"] == {
        "runs/tiny_vqa/prune/log.csv": ["expected_sparsity/overall", "target_sparsity"]}
    # a spec compiled alone again keeps the other's plots, as it keeps its stages
    compile_specs([tiny()], tmp_path)
    plots = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["plots"]
    assert {next(iter(p)) for p in plots} == set(by_id)
