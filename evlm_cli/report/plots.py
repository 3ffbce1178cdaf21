"""Pictures of runs, for those who would rather look than read: PNG files drawn with matplotlib
(Agg, no display, nothing downloaded), each written atomically.

- `pareto`: `evlm diff --plot`, the task metric against measured latency, one panel per batch
  size, every run given plus its teacher, with error bars over seeds; and sparsity per encoder.
- `run_plot`: `evlm show --plot`, the per-layer allocation of kept heads and FFN neurons, the
  encoders side by side, and the training curves of each stage from its log.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path

from evlm_cli.core.config import ENCODERS
from evlm_cli.core.io import atomic_path
from evlm_cli.report.runs import Loaded, Run, members_of
from evlm_cli.report.seeds import mean_std
from evlm_cli.report.show import UNIT_LABELS

# Curves drawn per stage from log.csv, when the log has them, each in its own panel.
CURVES = (("loss", "training loss"), ("expected_sparsity/overall", "expected sparsity (prune)"))
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    _pyplot().close(fig)
    return path


def _points(loaded: Loaded, batch: str) -> list[tuple[float, float]]:
    """(student latency ms, metric) per seed of a run or group at one batch size."""
    return [(run.results.latency_ms[batch].student, run.results.student.score.value)
            for run in loaded.members if batch in run.results.latency_ms
            and run.results.student.score.value is not None]


def pareto(runs: list[Loaded], path: Path) -> Path:
    """Metric against latency per batch size (teacher, the dense student where it was scored,
    and the student of each run; a group of seeds at its mean with ± std bars, each seed faint
    behind), and sparsity per encoder."""
    plt = _pyplot()
    members = members_of(runs)
    results = [run.results for run in members]
    batches = list(dict.fromkeys(b for r in results for b in r.latency_ms))
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4.2),
                             squeeze=False)
    metric = results[0].metric
    for ax, batch in zip(axes[0], batches, strict=False):
        timed = [r for r in results if batch in r.latency_ms]
        teachers = {(r.latency_ms[batch].teacher, r.teacher.score.value) for r in timed
                    if r.teacher.score.value is not None}  # a split without answers: unscored
        if teachers:
            ax.scatter(*zip(*teachers, strict=True), marker="s", color="black", label="teacher")
        # the depth-only baseline, where a dense stage trained it: a diamond per distinct one
        dense = {(r.latency_ms[batch].dense_student, r.dense.value) for r in timed
                 if r.dense.value is not None}
        if dense:
            ax.scatter(*zip(*dense, strict=True), marker="D", color="grey",
                       label="dense student (not pruned)")
        for index, run in enumerate(runs):
            color = f"C{index}"
            points = _points(run, batch)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if len(points) > 1:
                ax.scatter(xs, ys, color=color, alpha=0.3, s=12)
            (x, dx), (y, dy) = mean_std(list(xs)), mean_std(list(ys))
            ax.errorbar([x], [y], xerr=[dx], yerr=[dy], fmt="o", color=color, capsize=3,
                        label=run.name + (f" (n={len(points)})" if len(points) > 1 else ""))
        ax.set_xlabel(f"latency at {batch.replace('_', ' ')} (ms, median)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs latency, {batch.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        values = [[getattr(member.results.sparsity, key) or 0.0
                   for key in ("overall", *ENCODERS)] for member in run.members]
        means = [sum(column) / len(column) for column in zip(*values, strict=True)]
        ax.bar([j + index * width for j in range(4)], means, width, label=run.name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(4)], ["overall", *ENCODERS])
    ax.set_ylabel("sparsity of prunable params")
    ax.set_title("what was removed, per encoder")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path: Path) -> dict[str, list[float]]:
    """A stage's log.csv as columns of floats (empty cells skipped); {} when absent or empty."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key and value not in (None, ""):
                try:
                    columns.setdefault(key, []).append(float(value))
                except ValueError:
                    continue
    return columns


def allocation_grid(masks: dict) -> list[tuple[str, list[list[float]], list[str]]]:
    """Per encoder: (name, rows of kept fractions per layer, row labels), for a heatmap."""
    grids = []
    for encoder, info in masks.get("encoders", {}).items():
        rows, labels = [], []
        for unit, label in UNIT_LABELS.items():
            cells = [layer[unit]["kept"] / layer[unit]["total"] if layer[unit]["total"] else 0.0
                     for layer in info["layers"] if unit in layer]
            if cells:
                rows.append(cells)
                labels.append(label)
        if rows:
            grids.append((encoder, rows, labels))
    return grids


def run_plot(run: Run, logs: dict[str, Path], path: Path) -> Path:
    """The allocation heatmaps of each encoder side by side (top row) and each stage's
    training curves (bottom row): `logs` maps a stage name to its log.csv."""
    plt = _pyplot()
    grids = allocation_grid(run.masks or {})
    curves = {stage: read_log(log) for stage, log in logs.items()}
    curves = {stage: columns for stage, columns in curves.items() if columns.get("step")}
    top = max(len(grids), 1)
    fig, axes = plt.subplots(2, max(top, len(CURVES)), figsize=(4.5 * max(top, len(CURVES)), 7),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (encoder, rows, labels) in zip(axes[0], grids, strict=False):
        ax.set_visible(True)
        width = max(len(row) for row in rows)
        padded = [row + [float("nan")] * (width - len(row)) for row in rows]
        image = ax.imshow(padded, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(width), [str(i) for i in range(width)])
        ax.set_xlabel("layer")
        ax.set_title(f"{encoder}: share kept")
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
    if not grids:
        axes[0][0].set_visible(True)
        axes[0][0].text(0.5, 0.5, "no allocation yet (the prune stage has not run)",
                        ha="center", va="center")
        axes[0][0].axis("off")
    for ax, (key, title) in zip(axes[1], CURVES, strict=False):
        drawn = [(stage, columns) for stage, columns in curves.items()
                 if len(columns.get(key, [])) == len(columns["step"])]
        if not drawn:
            continue
        ax.set_visible(True)
        for stage, columns in drawn:
            ax.plot(columns["step"], columns[key], label=stage, lw=1)
        if key.startswith("expected_sparsity") and curves:
            stage, columns = drawn[0]
            if len(columns.get("target_sparsity", [])) == len(columns["step"]):
                ax.plot(columns["step"], columns["target_sparsity"], "k--", lw=1, label="target")
        if key == "loss" and all(v > 0 for _, columns in drawn for v in columns[key]):
            ax.set_yscale("log")  # the stages' losses differ by orders of magnitude
        ax.set_xlabel("optimiser step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(run.name)
    fig.tight_layout()
    return _save(fig, path)
