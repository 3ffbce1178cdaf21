"""Runs as text: the end-of-run summary, `evlm diff` (a table, Markdown or JSON) and
`evlm show` (settings, stage status, results and the allocation heatmap)."""

from __future__ import annotations

import json

from evlm_cli.core.config import ENCODERS
from evlm_cli.core.results import EvaluateResults
from evlm_cli.report.runs import CAPTION, PASS, Loaded, Run, SeedGroup, result_rows
from evlm_cli.report.seeds import MeanStd, seed_figures

# The caption metrics the summary shows, as the captioning literature writes them.
CAPTION_LABELS = {"bleu_4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
# Shades of the allocation heatmap, from nothing kept to all: a cell's share picks one.
SHADES = " ░▒▓█"
# Unit kinds in the order the heatmap lists them, with their labels.
UNIT_LABELS = {"heads": "heads", "cross_heads": "cross heads", "ffn": "ffn"}
# What the seeds varied, per seed_scope, for the summary.
SCOPE_TEXT = {
    "compression": "the seeds varied pruning, fine-tuning and evaluation; the data split, the "
                   "teachers and the distilled student are shared (seed_scope compression)",
    "all": "the seeds varied every stage: each trained its own teachers and distilled student "
           "(seed_scope all)",
}


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
             row(r.metric, teacher.score.value, _or_dash(dense.value), student.score.value, ".4f",
                 f"   retention {student.retention:.1%}" + (
                     f" (dense {dense.retention:.1%})" if dense.value is not None else "")),
             *detail_lines(r),
             row("params (M)", teacher.size.params / 1e6, dense.size.params / 1e6,
                 student.size.params / 1e6, ".2f"),
             row("GFLOPs / example", teacher.size.gflops_per_example,
                 dense.size.gflops_per_example, student.size.gflops_per_example, ".3f")]
    for bs, lat in r.latency_ms.items():
        lines.append(row(f"{PASS} {bs.replace('_', ' ')} (ms)", lat.teacher, lat.dense_student,
                         lat.student, ".2f", f"   speedup {r.speedup[bs].total:.2f}x"))
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
    lines += [f"  warning: {line}" for line in r.warnings]
    lines.append(row("file size (MB)", _mb(teacher.size.size_bytes), _mb(dense.size.size_bytes),
                     _mb(student.size.size_bytes), ".2f"))
    lines += exported_rows(r)
    return "\n".join(lines)


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
    batches = list(r.latency_ms)
    head = "".join(f"{'ms ' + bs.replace('batch_', 'b'):>10}{'speedup':>9}" for bs in batches)
    lines = ["", f"  {'student, ONNX Runtime':<24}{'metric':>10}{'retention':>11}"
             f"{head}{'MB':>8}"]
    cells = "".join(f"{r.latency_ms[bs].teacher_onnx_fp32:>10.2f}{'':>9}" for bs in batches)
    lines.append(f"  {'teacher fp32':<24}{'-':>10}{'-':>10} {cells}")
    for name, e in r.exported.items():
        cells = "".join(f"{getattr(r.latency_ms[bs], name):>10.2f}{e.speedup[bs]:>8.2f}x"
                        for bs in batches)
        lines.append(f"  {name.replace('onnx_', ''):<24}{e.value:>10.4f}{e.retention:>10.1%} "
                     f"{cells}{e.size_bytes / 1e6:>8.2f}")
    fp32 = r.exported.get("onnx_fp32")
    if fp32 is not None:
        lines.append("  fp32 student over the teacher: " + ", ".join(
            f"{ratio:.2f} of the FLOPs ratio at {bs.replace('_', ' ')}"
            for bs, ratio in fp32.over_flops_ratio.items()))
    return lines


def _stat_text(found: MeanStd | None) -> str:
    return "-" if found is None else f"{_fmt(found.mean)} ± {_fmt(found.std)}"


def group_table(group: SeedGroup) -> str:
    """The seeds of one spec: every result as mean ± std, then each seed's value."""
    seeds, figures = group.seeds, seed_figures(group)
    header = ["", f"mean ± std (n={len(seeds)})", *(f"seed {seed}" for seed in seeds)]
    rows = [[label, _stat_text(figures.stats[label]),
             *(_fmt(per_seed.get(label)) for per_seed in figures.per_seed)]
            for label in figures.labels]
    scope = "compression" if group.params.get("shared_seed") is not None else "all"
    head = _headline(group.name, group.params).split(": ", 1)[1]
    lines = [f"{group.name}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {head}",
             f"  {SCOPE_TEXT[scope]}"]
    lines += ["  " + line for line in render(header, rows, "table").splitlines()]
    warned = [f"  warning: seed {seed}: {line}" for seed, run in zip(seeds, group.runs, strict=True)
              for line in run.results.warnings]
    return "\n".join(lines + warned)


def key_settings(params: dict) -> list[tuple[str, str]]:
    """The resolved settings a reader checks first, as (label, value) rows."""
    t, s, p = params["teacher"], params["student"], params["prune"]
    tt, pt = params["task_teacher"], params["pretrain"]
    shape = lambda e: f"{e['layers']} layers x {e['width']} wide, {e['heads']} heads, ffn {e['ffn']}"  # noqa: E731
    epochs = lambda train: f"{train['epochs']:g} epoch{'s' if train['epochs'] != 1 else ''}"  # noqa: E731
    weights = ", ".join(f"{k} {v:g}" for k, v in pt["weights"].items() if v)
    return [
        ("task", params["task"]),
        ("pairs", f"{params['pairs']['source']} at {params['pairs']['image_size']} px"
                  + (f", limit {params['pairs']['limit']}" if params["pairs"]["limit"] else "")),
        ("data", f"{params['data']['source']} at {params['data']['image_size']} px"
                 + (f", limit {params['data']['limit']}" if params["data"]["limit"] else "")),
        ("teacher", "vision " + shape(t["vision"]) + "; text " + shape(t["text"])
         + "; fusion " + shape(t["fusion"])),
        ("pre-training", ("from " + t["checkpoint"] + ", then " if t["checkpoint"] else "")
         + f"{epochs(pt['train'])} of {weights}"),
        ("task teacher", "imported from " + tt["checkpoint"] if tt["checkpoint"] else
         f"fine-tuned {epochs(tt['train'])}"),
        ("student layers", f"vision {s['vision_layers']}, text {s['text_layers']}, "
                           f"fusion {s['fusion_layers']}"),
        ("distill", f"on the pairs, {epochs(params['distill']['train'])}"
                    if params["distill"]["enabled"] else "off"),
        ("prune", f"{p['mode']} to {p['target_sparsity']:.0%} of prunable params, units "
                  + ", ".join(p["units"])),
        ("seed, device", f"{params['seed']}, {params['device']}"),
    ]


def allocation_lines(masks: dict) -> list[str]:
    """The kept heads and FFN neurons of each layer, per encoder, as a compact text heatmap:
    one row per encoder and unit kind, one cell per layer, a shade and `kept/total`."""
    if "encoders" not in masks:
        return []
    lines = [f"  allocation: kept per layer, shaded '{SHADES[1:]}' from a few to all"]
    for encoder, info in masks["encoders"].items():
        for unit, label in UNIT_LABELS.items():
            cells = []
            for layer in info["layers"]:
                if unit not in layer:
                    continue
                kept, total = layer[unit]["kept"], layer[unit]["total"]
                cells.append(f"{_shade(kept, total)} {kept:>3}/{total:<3}")
            if cells:
                lines.append(f"    {encoder:<7}{label:<12}" + "  ".join(cells))
    return lines


def _shade(kept: int, total: int) -> str:
    """Blank for none, full for all, and thirds of the way between in three shades."""
    if kept == 0 or kept == total:
        return SHADES[0] if kept == 0 else SHADES[-1]
    return SHADES[1 + min(2, 3 * kept // total)]


def show_text(loaded: Loaded, status: dict[str, list[str]]) -> str:
    """`evlm show`: key settings, each stage's status, then the summary table when finished
    (of a group of seeds: the first seed's settings and every seed's stages)."""
    lines = [f"{loaded.name}", "  settings"]
    lines += [f"    {label:<16}{value}" for label, value in key_settings(loaded.params)]
    lines.append("  stages")
    width = max((len(stage) for stage in status), default=0) + 2
    for stage, reasons in status.items():
        lines.append(f"    {stage:<{width}}" + ("up to date" if not reasons else
                                                "would rerun: " + "; ".join(reasons)))
    lines.append("")
    finished = all(run.results is not None for run in loaded.members)
    lines.append(run_summary(loaded) if finished else
                 "  no metrics yet: `evlm run` its spec to finish the run")
    for run in loaded.members:
        if run.masks:
            lines += ["", *([f"  {run.name}"] if isinstance(loaded, SeedGroup) else []),
                      *allocation_lines(run.masks)]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def diff_rows(loaded: list[Loaded]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every result, then every param that differs between the runs.

    Results line up by label, so runs measured at different latency batch sizes show "-" where
    one has no figure.
    """
    columns = [column for entry in loaded for column in _columns(entry)]
    header = ["", *(name for name, _, _ in columns)]
    labels = list(dict.fromkeys(label for _, res, _ in columns for label in res))
    rows = [[label, *(res.get(label, "-") for _, res, _ in columns)] for label in labels]
    flat = [f for _, _, f in columns]
    keys = sorted(set().union(*flat) - {"name", "shared_seed"})
    rows += [[k, *(_fmt(f.get(k)) for f in flat)] for k in keys
             if len({json.dumps(f.get(k)) for f in flat}) > 1]
    return header, rows


def _columns(entry: Loaded) -> list[tuple[str, dict[str, str], dict]]:
    """(header, label -> shown result, flat params) per column: one for a run; for a group of
    seeds, mean ± std first, then one per seed."""
    if isinstance(entry, Run):
        return [(entry.name, {k: _fmt(v) for k, v in result_rows(entry.results)},
                 _flatten(entry.params))]
    singles = [column for run in entry.runs for column in _columns(run)]
    figures = seed_figures(entry)
    summary = {label: _stat_text(figures.stats[label]) for label in figures.labels}
    flat = {**_flatten(entry.params), "seed": ",".join(map(str, entry.seeds))}
    return [(f"{entry.name} (mean ± std, n={len(entry.runs)})", summary, flat), *singles]


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) for r in [header, *rows])


def _run_json(run: Run) -> dict:
    return {"metrics": run.results.to_json(), "params": run.params}


def diff_json(loaded: list[Loaded]) -> str:
    """Each run's results (its metrics.json) and params; a group of seeds as its seeds' runs
    and, per result, {"mean", "std"}."""
    out = {}
    for entry in loaded:
        if isinstance(entry, Run):
            out[entry.name] = _run_json(entry)
            continue
        stats = seed_figures(entry).stats
        out[entry.name] = {"seeds": [run.name for run in entry.runs],
                           "mean_std": {label: found._asdict() for label, found in stats.items()
                                        if found is not None},
                           "runs": {run.name: _run_json(run) for run in entry.runs}}
    return json.dumps(out, indent=2)
