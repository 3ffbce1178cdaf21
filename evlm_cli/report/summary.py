"""The end-of-run summary: teacher, dense student and student side by side, or a group of
seeds as mean ± std, with the exported files' rows."""

from __future__ import annotations

from evlm_cli.core.config import ENCODERS
from evlm_cli.core.results import EvaluateResults, Timing
from evlm_cli.report.runs import CAPTION, PASS, Loaded, Run, SeedGroup
from evlm_cli.report.seeds import MeanStd, seed_figures

# The caption metrics the summary shows, as the captioning literature writes them.
CAPTION_LABELS = {"bleu_4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
# What the seeds varied, per seed_scope, for the summary.
SCOPE_TEXT = {
    "compression": "the seeds varied pruning, fine-tuning and evaluation; the data split, the "
                   "teachers and the distilled student are shared (seed_scope compression)",
    "all": "the seeds varied every stage: each trained its own teachers and distilled student "
           "(seed_scope all)",
}


def gate_lines(r: EvaluateResults) -> list[str]:
    """Where training left the gates, and how much the final selection overruled them."""
    if r.sparsity.expected_at_end is None:
        return []
    return [f"  {'gates at the end':<24}expected sparsity {r.sparsity.expected_at_end:.3f}; the "
            f"final selection overruled {r.sparsity.overruled_share:.1%} of the units"]


def run_summary(loaded: Loaded) -> str:
    """The end-of-run table of a run, or of a group of seeds."""
    return group_table(loaded) if isinstance(loaded, SeedGroup) else summary_table(loaded)


def _headline(name: str, params: dict) -> str:
    prune = params["prune"]
    return (f"{name}: {params['task']}, {prune['mode']} pruning to "
            f"{prune['target_sparsity']:.0%}")


def summary_table(run: Run) -> str:
    """The end-of-run table: teacher, dense distilled student and pruned student side by side,
    then speed split into depth and pruning, and sparsity."""
    r = run.results
    teacher, dense, student = r.teacher, r.dense, r.student

    def row(label: str, t, d, s, spec: str, tail: str = "") -> str:
        return f"  {label:<24}" + "".join(f"{c:>12{spec}}" if isinstance(c, float) else f"{c:>12}"
                                          for c in (t, d, s)) + tail

    lines = [_headline(run.name, run.params),
             row("", "teacher", "dense", "student", ""),
             row(r.metric, _or_dash(teacher.score.value), _or_dash(dense.value),
                 _or_dash(student.score.value), ".4f", _retention_text(r)),
             *unscored_lines(r),
             *detail_lines(r),
             row("params (M)", teacher.size.params / 1e6, dense.size.params / 1e6,
                 student.size.params / 1e6, ".2f"),
             row("GFLOPs / example", teacher.size.gflops_per_example,
                 dense.size.gflops_per_example, student.size.gflops_per_example, ".3f")]
    mark = CONTENDED_MARK if r.timing.contended else ""
    for bs, lat in r.latency_ms.items():
        lines.append(row(f"{PASS} {bs.replace('_', ' ')} (ms){mark}", lat.teacher,
                         lat.dense_student, lat.student, ".2f",
                         f"   speedup {r.speedup[bs].total:.2f}x"))
    for bs, gen in (r.generation or {}).items():
        lines.append(row(f"{CAPTION} {bs.replace('_', ' ')} (ms)", gen.teacher_ms, "-",
                         gen.student_ms, ".2f", f"   speedup {gen.speedup:.2f}x"))
    for bs, split in r.speedup.items():
        lines.append(f"  {'speedup ' + bs.replace('_', ' '):<24}depth {split.depth:.2f}x "
                     f"x pruning {split.pruning:.2f}x = {split.total:.2f}x; "
                     f"{split.over_flops_ratio:.2f} of the FLOPs ratio (pruning alone "
                     f"{split.pruning_over_flops_ratio:.2f})")
    sparsity = {e: getattr(r.sparsity, e) for e in ENCODERS}
    lines.append(row("sparsity (prunable)", "", "", r.sparsity.overall, ".3f", "   " + ", ".join(
        f"{e} {v:.3f}" for e, v in sparsity.items() if v is not None)))
    lines += gate_lines(r)
    lines += [f"  warning: {line}" for line in r.warnings]
    lines.append(row("file size (MB)", _mb(teacher.size.size_bytes), _mb(dense.size.size_bytes),
                     _mb(student.size.size_bytes), ".2f"))
    lines += exported_rows(r)
    lines += timing_lines(r.timing, run.name)
    return "\n".join(lines)


# Marks the latencies of a run timed while other processes took the cores it needed.
CONTENDED_MARK = " *"


def timing_lines(timing: Timing, name: str) -> list[str]:
    """How the latencies were taken, and, when other processes competed for the cores, that
    they are not to be trusted and how to retake them."""
    how = (f"  timed by {timing.taken_by} on {timing.device}, {timing.threads} threads of "
           f"{timing.cores} cores, median of {timing.repeats}")
    if not timing.contended:
        return ["", how + f"; other processes kept {timing.others_busy_during:.1f} cores busy"]
    return ["", how,
            f" {CONTENDED_MARK.strip()} contended: other processes kept "
            f"{timing.others_busy_before:.1f} cores busy before timing and "
            f"{timing.others_busy_during:.1f} while it ran: these latencies and speedups are "
            f"not the model's; retake them alone with `evlm bench {name}`"]


def _retention_text(r: EvaluateResults) -> str:
    if r.student.retention is None:
        return ""
    dense = r.dense.retention
    return f"   retention {r.student.retention:.1%}" + (
        f" (dense {dense:.1%})" if dense is not None else "")


def unscored_lines(r: EvaluateResults) -> list[str]:
    """Why a model has no metric (a test split without answers), said once, and each answer
    type's accuracy where the data gives types (VQA)."""
    reasons = {score.unscored for score in (r.teacher.score, r.student.score) if score.unscored}
    lines = [f"  {r.metric}: {reason}" for reason in sorted(reasons)]
    teacher, student = r.teacher.score.by_answer_type or {}, r.student.score.by_answer_type or {}
    lines += [f"  {'  ' + kind:<24}{_cell(teacher.get(kind), '.4f')}{'-':>12}"
              f"{_cell(value, '.4f')}" for kind, value in student.items()]
    return lines


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value


def _mb(size_bytes: int | None) -> float | str:
    return "-" if size_bytes is None else size_bytes / 1e6


def detail_lines(r: EvaluateResults) -> list[str]:
    """The task's other measures, teacher next to student, with a "-" for the dense student
    (scored on the headline metric only): each recall (retrieval), each caption metric
    (captioning)."""
    teacher, student = r.teacher.score, r.student.score
    recalls = [(key.upper().replace("_R", "@"), (teacher.recall or {}).get(key), value)
               for key, value in (student.recall or {}).items() if "_r" in key]
    captions = [(label, (teacher.caption or {}).get(key), student.caption[key])
                for key, label in CAPTION_LABELS.items() if key in (student.caption or {})]
    return [f"  {label:<24}{_cell(t, '.4f')}{'-':>12}{_cell(s, '.4f')}"
            for label, t, s in recalls + captions]


def _cell(value: float | None, spec: str) -> str:
    return f"{'-':>12}" if value is None else f"{value:>12{spec}}"


def exported_rows(r: EvaluateResults) -> list[str]:
    """The exported student, one row per file (the int8 row never replaces the fp32 one), timed
    next to the teacher exported the same way: the speedups compare like with like."""
    if not r.exported:
        return []
    # the settings the files were timed in (on a CUDA spec, the CPU's)
    batches = [bs for bs, lat in r.latency_ms.items() if lat.teacher_onnx_fp32 is not None]
    head = "".join(f"{'ms ' + bs.replace('batch_', 'b'):>10}{'speedup':>9}" for bs in batches)
    lines = ["", f"  {'student, ONNX Runtime':<24}{'metric':>10}{'retention':>11}"
             f"{head}{'MB':>8}"]
    cells = "".join(f"{r.latency_ms[bs].teacher_onnx_fp32:>10.2f}{'':>9}" for bs in batches)
    lines.append(f"  {'teacher fp32':<24}{'-':>10}{'-':>10} {cells}")
    for name, e in r.exported.items():
        cells = "".join(f"{getattr(r.latency_ms[bs], name):>10.2f}{e.speedup[bs]:>8.2f}x"
                        for bs in batches)
        value = "-" if e.value is None else f"{e.value:.4f}"
        retention = "-" if e.retention is None else f"{e.retention:.1%}"
        lines.append(f"  {name.replace('onnx_', ''):<24}{value:>10}{retention:>10} "
                     f"{cells}{e.size_bytes / 1e6:>8.2f}")
        fastest = ", ".join(f"{ratio:.2f}x at {bs.replace('_', ' ')}"
                            for bs, ratio in e.speedup_over_fastest_teacher.items())
        lines.append(f"  {'':<24}over the teacher's faster runtime (PyTorch or ONNX): {fastest}")
    fp32 = r.exported.get("onnx_fp32")
    if fp32 is not None:
        lines.append("  fp32 student over the teacher: " + ", ".join(
            f"{ratio:.2f} of the FLOPs ratio at {bs.replace('_', ' ')}"
            for bs, ratio in fp32.over_flops_ratio.items()))
    return lines


def stat_text(found: MeanStd | None) -> str:
    return "-" if found is None else f"{fmt(found.mean)} ± {fmt(found.std)}"


def group_table(group: SeedGroup) -> str:
    """The seeds of one spec: every result as mean ± std, then each seed's value."""
    seeds, figures = group.seeds, seed_figures(group)
    header = ["", f"mean ± std (n={len(seeds)})", *(f"seed {seed}" for seed in seeds)]
    rows = [[label, stat_text(figures.stats[label]),
             *(fmt(per_seed.get(label)) for per_seed in figures.per_seed)]
            for label in figures.labels]
    scope = "compression" if group.params.get("shared_seed") is not None else "all"
    head = _headline(group.name, group.params).split(": ", 1)[1]
    lines = [f"{group.name}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {head}",
             f"  {SCOPE_TEXT[scope]}"]
    lines += ["  " + line for line in render(header, rows, "table").splitlines()]
    warned = [f"  warning: seed {seed}: {line}" for seed, run in zip(seeds, group.runs, strict=True)
              for line in run.results.warnings]
    return "\n".join(lines + warned)


def fmt(v) -> str:
    """A figure as the tables show it: 4 significant digits, "-" for none."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) for r in [header, *rows])
