"""`evlm diff` tables line results up by what they measure, not by position."""

from evlm_cli.diff import allocation_lines, diff_rows, render, summary_table


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
