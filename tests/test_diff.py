"""`evlm diff` tables line results up by what they measure, not by position."""

from dataclasses import replace

import pytest

from evlm_cli.core.results import Dense, Exported, Speedup
from evlm_cli.report.diff import diff_rows
from evlm_cli.report.runs import result_rows
from evlm_cli.report.show import allocation_lines
from evlm_cli.report.summary import render, summary_table
from tests.helpers.runs import fake_run, with_params

PRUNED_90 = {"task": "vqa", "prune": {"mode": "modal-adaptive", "target_sparsity": 0.9}}


def test_rows_align_by_label_when_runs_measured_different_batch_sizes():
    header, rows = diff_rows([fake_run("a", [1, 32], 1e-4), fake_run("b", [32], 3e-4)])
    by_label = {row[0]: row[1:] for row in rows}
    assert header == ["", "a", "b"]
    assert by_label["latency batch 32 (ms)"] == ["32", "32"]
    assert by_label["latency batch 1 (ms)"] == ["1", "-"]
    assert by_label["finetune.lr"] == ["0.0001", "0.0003"]
    assert "name" not in by_label  # only differing params, and never the name
    assert render(header, rows, "markdown").splitlines()[1] == "|---|---|---|"


def test_summary_shows_the_prune_warnings_under_the_sparsity():
    run = with_params(fake_run("a"), **PRUNED_90)
    assert "warning" not in summary_table(run)
    run = replace(run, results=replace(run.results, warnings=(
        "the text encoder keeps 0.050 of its prunable parameters",)))
    lines = summary_table(run).splitlines()
    at = next(i for i, line in enumerate(lines) if "sparsity (prunable)" in line)
    # where the gates ended and how much the final selection overruled them, then warnings
    assert lines[at + 1] == ("  gates at the end        expected sparsity 0.512; the final "
                             "selection overruled 2.5% of the units")
    assert lines[at + 2] == ("  warning: the text encoder keeps 0.050 of its prunable "
                             "parameters")
    unpruned = replace(run.results, sparsity=replace(run.results.sparsity, expected_at_end=None,
                                                     overruled_share=None))
    assert "gates at the end" not in summary_table(replace(run, results=unpruned))


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
    assert split.total == pytest.approx(3.0)
    assert split.depth == pytest.approx(2.0) and split.pruning == pytest.approx(1.5)
    assert split.depth_over_flops_ratio == pytest.approx(1.0)  # 2x faster for 2x fewer FLOPs
    assert split.pruning_over_flops_ratio == pytest.approx(0.5)  # 1.5x for 3x fewer
    assert split.over_flops_ratio == pytest.approx(0.5)  # 3x for 6x fewer


def test_summary_shows_the_dense_student_between_teacher_and_student():
    run = with_params(fake_run("a", [1]), task="vqa",
                      prune={"mode": "modal-adaptive", "target_sparsity": 0.5})
    r = run.results
    r = replace(r, latency_ms={"batch_1": replace(r.latency_ms["batch_1"], dense_student=1.6)},
                speedup={"batch_1": Speedup(total=2.0, depth=1.25, pruning=1.6,
                                            depth_over_flops_ratio=0.625,
                                            pruning_over_flops_ratio=0.8, over_flops_ratio=0.5)})
    run = replace(run, results=r)
    lines = summary_table(run).splitlines()
    assert lines[1].split() == ["teacher", "dense", "student"]
    assert lines[2].split() == ["vqa_accuracy", "0.9500", "-", "0.9000", "retention", "94.7%"]
    assert next(x for x in lines if "params (M)" in x).split()[-3:] == ["3.00", "2.00", "1.00"]
    assert next(x for x in lines if "latency batch 1" in x).split()[4:7] == ["2.00", "1.60", "1.00"]
    assert ("speedup batch 1         depth 1.25x x pruning 1.60x = 2.00x; 0.50 of the FLOPs "
            "ratio (pruning alone 0.80)") in "\n".join(lines)
    rows = dict(result_rows(r))
    assert rows["speedup from depth batch 1"] == 1.25 and rows["dense params (M)"] == 2.0
    assert "dense vqa_accuracy" not in rows  # timed, not scored
    # once a dense stage trained it, the dense student is scored in the metric's row too
    r = replace(r, dense=Dense(value=0.93, retention=0.93 / 0.95, size=r.dense.size))
    lines = summary_table(replace(run, results=r)).splitlines()
    assert lines[2].split() == ["vqa_accuracy", "0.9500", "0.9300", "0.9000", "retention", "94.7%",
                                "(dense", "97.9%)"]
    rows = dict(result_rows(r))
    assert rows["dense vqa_accuracy"] == 0.93 and rows["dense retention"] == pytest.approx(0.979, abs=1e-3)


def test_summary_times_the_exported_student_against_the_exported_teacher():
    run = with_params(fake_run("a", [1, 32]), **PRUNED_90)
    r = run.results
    times = {"batch_1": (4.0, 2.0), "batch_32": (60.0, 10.0)}
    latency = {bs: replace(lat, teacher_onnx_fp32=times[bs][0], onnx_fp32=times[bs][1])
               for bs, lat in r.latency_ms.items()}
    fp32 = Exported(runtime="onnxruntime", value=0.9, retention=0.947, retention_of_student=1.0,
                    size_bytes=2_000_000, speedup={"batch_1": 2.0, "batch_32": 6.0},
                    over_flops_ratio={"batch_1": 0.5, "batch_32": 1.5},
                    speedup_over_pytorch_teacher={"batch_1": 1.0, "batch_32": 6.4},
                    speedup_over_fastest_teacher={"batch_1": 1.0, "batch_32": 6.0})
    lines = summary_table(replace(run, results=replace(
        r, latency_ms=latency, exported={"onnx_fp32": fp32}))).splitlines()
    at = next(i for i, line in enumerate(lines) if "student, ONNX Runtime" in line)
    assert lines[at + 1].split() == ["teacher", "fp32", "-", "-", "4.00", "60.00"]
    assert lines[at + 2].split() == ["fp32", "0.9000", "94.7%", "2.00", "2.00x", "10.00", "6.00x",
                                     "2.00"]
    assert lines[at + 3].strip() == ("over the teacher's faster runtime (PyTorch or ONNX): 1.00x "
                                     "at batch 1, 6.00x at batch 32")
    assert lines[at + 4] == ("  fp32 student over the teacher: 0.50 of the FLOPs ratio at batch 1, "
                             "1.50 of the FLOPs ratio at batch 32")
    # without an export stage, no ONNX rows at all
    assert not any("ONNX" in line for line in summary_table(run).splitlines())
