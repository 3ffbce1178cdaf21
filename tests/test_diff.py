"""`evlm diff` tables line results up by what they measure, not by position."""

import pytest

from evlm_cli.report.diff import allocation_lines, diff_rows, render, result_rows, summary_table


def _run(name: str, batch_sizes: list[int], lr: float) -> dict:
    metrics = {
        "metric": "vqa_accuracy", "value": 0.9, "teacher_value": 0.95, "retention": 0.947,
        "params": 1_000_000, "teacher_params": 3_000_000, "gflops_per_example": 0.02,
        "teacher_gflops_per_example": 0.08,
        "latency_ms": {f"batch_{b}": {"student": float(b), "teacher": 2.0 * b} for b in batch_sizes},
        "speedup": {f"batch_{b}": 2.0 for b in batch_sizes},
        "sparsity": {"overall": 0.5, "vision": 0.6, "text": 0.4, "fusion": 0.3},
    }
    return {"name": name, "metrics": metrics, "params": {"name": name, "finetune": {"lr": lr}}}


def test_rows_align_by_label_when_runs_measured_different_batch_sizes():
    header, rows = diff_rows([_run("a", [1, 32], 1e-4), _run("b", [32], 3e-4)])
    by_label = {row[0]: row[1:] for row in rows}
    assert header == ["", "a", "b"]
    assert by_label["latency batch 32 (ms)"] == ["32", "32"]
    assert by_label["latency batch 1 (ms)"] == ["1", "-"]
    assert by_label["finetune.lr"] == ["0.0001", "0.0003"]
    assert "name" not in by_label  # only differing params, and never the name
    assert render(header, rows, "markdown").splitlines()[1] == "|---|---|---|"


def test_summary_shows_the_prune_warnings_under_the_sparsity():
    run = _run("a", [1], 1e-4)
    run["params"].update(task="vqa", prune={"mode": "modal-adaptive", "target_sparsity": 0.9})
    assert "warning" not in summary_table(run)
    run["metrics"]["warnings"] = ["the text encoder keeps 0.050 of its prunable parameters"]
    lines = summary_table(run).splitlines()
    at = next(i for i, line in enumerate(lines) if "sparsity (prunable)" in line)
    assert lines[at + 1] == ("  warning: the text encoder keeps 0.050 of its prunable "
                             "parameters")


def test_allocation_heatmap_lists_each_layer_kept_of_total():
    layer = lambda i, heads, ffn: {"layer": i, "heads": {"kept": heads, "total": 4},  # noqa: E731
                                   "ffn": {"kept": ffn, "total": 12}}
    masks = {"encoders": {"vision": {"layers": [layer(0, 4, 12), layer(1, 0, 5)]},
                          "fusion": {"layers": [{**layer(0, 1, 8),
                                                 "cross_heads": {"kept": 3, "total": 4}}]}}}
    lines = allocation_lines(masks)
    assert lines[0].startswith("  allocation")
    rows = {" ".join(line.split()[:2]): line for line in lines[1:]}
    assert rows["vision heads"].split()[2:] == ["█", "4/4", "0/4"]
    assert rows["vision ffn"].split()[2:] == ["█", "12/12", "▒", "5/12"]
    assert rows["fusion cross"].split()[3:] == ["▓", "3/4"]
    assert rows["fusion heads"].split()[2:] == ["░", "1/4"]
    assert allocation_lines({"mode": "none"}) == []


def test_the_speedup_splits_into_depth_and_pruning_by_hand():
    from evlm_cli.recipe.evaluate import speedup_split

    split = speedup_split({"batch_1": {"teacher": 12.0, "dense_student": 6.0, "student": 4.0}},
                          {"teacher": 0.3, "dense_student": 0.15, "student": 0.05})["batch_1"]
    assert split["depth"] == pytest.approx(2.0) and split["pruning"] == pytest.approx(1.5)
    assert split["depth_over_flops_ratio"] == pytest.approx(1.0)  # 2x faster for 2x fewer FLOPs
    assert split["pruning_over_flops_ratio"] == pytest.approx(0.5)  # 1.5x for 3x fewer
    assert split["over_flops_ratio"] == pytest.approx(0.5)  # 3x for 6x fewer


def test_summary_shows_the_dense_student_between_teacher_and_student():
    run = _run("a", [1], 1e-4)
    run["params"].update(task="vqa", prune={"mode": "modal-adaptive", "target_sparsity": 0.5})
    m = run["metrics"]
    m.update(dense_params=2_000_000, dense_gflops_per_example=0.04,
             speedup_split={"batch_1": {"depth": 1.25, "pruning": 1.6, "over_flops_ratio": 0.5,
                                        "pruning_over_flops_ratio": 0.8}})
    m["latency_ms"]["batch_1"]["dense_student"] = 1.6
    lines = summary_table(run).splitlines()
    assert lines[1].split() == ["teacher", "dense", "student"]
    assert lines[2].split() == ["vqa_accuracy", "0.9500", "-", "0.9000", "retention", "94.7%"]
    assert next(x for x in lines if "params (M)" in x).split()[-3:] == ["3.00", "2.00", "1.00"]
    assert next(x for x in lines if "latency batch 1" in x).split()[4:7] == ["2.00", "1.60", "1.00"]
    assert ("speedup batch 1         depth 1.25x x pruning 1.60x = 2.00x; 0.50 of the FLOPs "
            "ratio (pruning alone 0.80)") in "\n".join(lines)
    rows = dict(result_rows(m))
    assert rows["speedup from depth batch 1"] == 1.25 and rows["dense params (M)"] == 2.0
    # once a dense stage trained it, the dense student is scored in the metric's row too
    m.update(dense_value=0.93, dense_retention=0.93 / 0.95)
    lines = summary_table(run).splitlines()
    assert lines[2].split() == ["vqa_accuracy", "0.9500", "0.9300", "0.9000", "retention", "94.7%",
                                "(dense", "97.9%)"]
    rows = dict(result_rows(m))
    assert rows["dense vqa_accuracy"] == 0.93 and rows["dense retention"] == pytest.approx(0.979, abs=1e-3)


def test_summary_times_the_exported_student_against_the_exported_teacher():
    run = _run("a", [1, 32], 1e-4)
    run["params"].update(task="vqa", prune={"mode": "modal-adaptive", "target_sparsity": 0.9})
    m = run["metrics"]
    for bs, teacher_ms, student_ms in (("batch_1", 4.0, 2.0), ("batch_32", 60.0, 10.0)):
        m["latency_ms"][bs].update(teacher_onnx_fp32=teacher_ms, onnx_fp32=student_ms)
    m["exported"] = {"onnx_fp32": {
        "value": 0.9, "retention": 0.947, "size_bytes": 2_000_000,
        "speedup": {"batch_1": 2.0, "batch_32": 6.0},
        "over_flops_ratio": {"batch_1": 0.5, "batch_32": 1.5}}}
    lines = summary_table(run).splitlines()
    at = next(i for i, line in enumerate(lines) if "student, ONNX Runtime" in line)
    assert lines[at + 1].split() == ["teacher", "fp32", "-", "-", "4.00", "60.00"]
    assert lines[at + 2].split() == ["fp32", "0.9000", "94.7%", "2.00", "2.00x", "10.00", "6.00x",
                                     "2.00"]
    assert lines[at + 3] == ("  fp32 student over the teacher: 0.50 of the FLOPs ratio at batch 1, "
                             "1.50 of the FLOPs ratio at batch 32")
    # a run evaluated before the teacher was exported: no teacher row, no ratio
    del m["exported"]["onnx_fp32"]["over_flops_ratio"]
    for bs in m["latency_ms"]:
        del m["latency_ms"][bs]["teacher_onnx_fp32"]
    lines = summary_table(run).splitlines()
    assert not any("teacher fp32" in line or "FLOPs ratio at" in line for line in lines)
