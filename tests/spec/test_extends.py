"""`extends:`: a spec over its base, merged key by key, its problems located in the file that
wrote the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from evlm_cli.cli.main import main
from evlm_cli.spec.extends import merge_over
from evlm_cli.spec.load import InvalidSpecError, load_spec, validate_spec_text

ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path) -> list[str]:
    with pytest.raises(InvalidSpecError) as caught:
        load_spec(path)
    return caught.value.problems


def test_a_mapping_merges_key_by_key_and_anything_else_replaces():
    base = {"prune": {"mode": "uniform", "units": ["heads", "ffn"], "train": {"epochs": 1}},
            "export": {"opset": 17}, "augment": {"crop_scale": None}, "seed": 0}
    child = {"prune": {"units": ["heads"], "train": {"lr": 0.1}}, "export": None,
             "augment": {"crop_scale": [0.5, 1.0]}, "name": "c"}
    merged, replaced = merge_over(base, child)
    assert merged == {"prune": {"mode": "uniform", "units": ["heads"],
                                "train": {"epochs": 1, "lr": 0.1}},
                      "export": None, "augment": {"crop_scale": [0.5, 1.0]}, "seed": 0,
                      "name": "c"}
    assert sorted(replaced) == [("augment", "crop_scale"), ("export",), ("name",),
                                ("prune", "train", "lr"), ("prune", "units")]
    assert base["prune"]["units"] == ["heads", "ffn"]  # the base is left as it was


def test_a_base_is_found_next_to_the_spec_not_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path, "specs/base.yaml", "name: base\ntask: vqa\nprune:\n  target_sparsity: 0.7\n")
    child = write(tmp_path, "specs/child.yaml", "extends: base.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path)
    spec = load_spec("specs/child.yaml")
    assert (spec["name"], spec["prune"]["target_sparsity"]) == ("child", 0.7)
    assert "extends" not in spec
    assert load_spec(child) == spec


def test_a_chain_of_bases_merges_from_the_root_up(tmp_path):
    write(tmp_path, "a.yaml", "name: a\ntask: vqa\nprune:\n  target_sparsity: 0.7\n  mode: uniform\n")
    write(tmp_path, "b/b.yaml", "extends: ../a.yaml\nname: b\nprune:\n  target_sparsity: 0.3\n")
    c = write(tmp_path, "c.yaml", "extends: b/b.yaml\nname: c\nseed: 4\n")
    spec = load_spec(c)
    assert (spec["name"], spec["seed"]) == ("c", 4)
    assert (spec["prune"]["mode"], spec["prune"]["target_sparsity"]) == ("uniform", 0.3)


def test_a_key_written_in_the_base_is_located_there_and_one_written_over_it_here(tmp_path):
    base = write(tmp_path, "base.yaml", "name: base\ntask: vqa\nseed: -1\nprune:\n  min_keep: 2\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n\nprune:\n  min_keep: -1\n")
    assert problems_of(child) == [
        f"{base}:3: seed: -1 is less than the minimum 0",
        f"{child}:5: prune.min_keep: -1 is less than the minimum 0",
    ]


def test_a_key_the_spec_replaced_keeps_no_mark_from_the_base(tmp_path):
    # The base's export settings are gone: a problem under export is located at the spec's line.
    write(tmp_path, "base.yaml", "name: base\ntask: vqa\nexport:\n  opset: 17\n  int8: true\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\ntask: retrieval\n"
                                          "export: {opset: 17}\n")
    assert problems_of(child) == [
        f"{child}:4: export: the retrieval task cannot be exported yet (only vqa's single "
        "scoring graph is); set export: null"]


def test_extends_null_means_no_base():
    assert validate_spec_text("extends: null\nname: x\ntask: vqa\n", "x.yaml")["name"] == "x"


def test_validate_exits_2_naming_the_base_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "base.yaml", "name: base\ntask: vqa\nprune:\n  target_sparsity: 1.2\n")
    write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n")
    result = CliRunner().invoke(main, ["validate", "child.yaml"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "base.yaml:4: prune.target_sparsity: 1.2 is greater than the maximum 0.95"]


@pytest.mark.e2e
def test_a_cycle_exits_2_through_the_real_command(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\ntask: vqa\n")
    write(tmp_path, "b.yaml", "name: b\nextends: a.yaml\n")
    done = subprocess.run([sys.executable, "-m", "evlm_cli", "validate", "a.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "b.yaml:2: extends: 'a.yaml' leads back to a spec on the way here, a cycle: "
        "a.yaml -> b.yaml -> a.yaml"]
