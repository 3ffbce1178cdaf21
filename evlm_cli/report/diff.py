"""Runs side by side: the end-of-run summary, `evlm diff` tables (text, Markdown, JSON), plots."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import yaml

from evlm_cli.core.config import ENCODERS
from evlm_cli.core.errors import EvlmError
from evlm_cli.core.layout import RUNS
from evlm_cli.pipeline.registry import FINAL_KIND

# metrics.json groups of a task's other measures, each with a "teacher_" twin.
DETAILS = ("recall", "scores")
# The caption metrics the summary shows, as the captioning literature writes them.
CAPTION_LABELS = {"bleu_4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
# The prune stage's account of what it kept, per encoder and layer (`L0Gates.summary`).
MASKS = Path("prune") / "masks.json"
# Shades of the allocation heatmap, from nothing kept to all: a cell's share picks one.
SHADES = " ░▒▓█"
# Unit kinds in the order the heatmap lists them, with their labels.
UNIT_LABELS = {"heads": "heads", "cross_heads": "cross heads", "ffn": "ffn"}
# Timed work, teacher next to student: (label, metrics.json times, their speedups). Every task
# times one pass; captioning also whole captions.
TIMINGS = (("latency", "latency_ms", "speedup"),
           ("caption", "generation_ms", "generation_speedup"))


def load_run(name: str, root: Path = Path("."), require_metrics: bool = True) -> dict:
    """A run's resolved params and final metrics (None when unfinished and not required).

    `NAME@REV` reads them as committed at git revision REV (`load_run_at`).
    """
    if "@" in name:
        return load_run_at(name, root, require_metrics)
    folder = root / RUNS / name
    metrics_path = folder / FINAL_KIND / "metrics.json"
    params_path = folder / "params.yaml"
    if not params_path.is_file():
        raise EvlmError(f"{params_path}: no such run (compile or run its spec first)")
    metrics_text = _file_text(metrics_path)
    if metrics_text is None and require_metrics:
        raise EvlmError(f"{metrics_path}: missing; the run has not finished (evlm run its spec)")
    masks_path = folder / MASKS
    return {"name": name, "params": yaml.safe_load(params_path.read_text()),
            "metrics": _json(metrics_text, str(metrics_path)),
            "masks": _json(_file_text(masks_path), str(masks_path))}


# A run of one seed of a spec's `seeds`: <name>-s<seed> (`spec.seed_runs`).
SEED_RUN = re.compile(r"^(?P<base>.+)-s(?P<seed>\d+)$")
# What the seeds varied, per seed_scope, for the summary.
SCOPE_TEXT = {
    "compression": "the seeds varied pruning, fine-tuning and evaluation; the data split, the "
                   "teachers and the distilled student are shared (seed_scope compression)",
    "all": "the seeds varied every stage: each trained its own teachers and distilled student "
           "(seed_scope all)",
}


def seed_members(name: str, root: Path = Path(".")) -> list[str]:
    """The runs <name>-s<seed> under runs/ (those with a params.yaml), in seed order."""
    found = []
    folder = root / RUNS
    if folder.is_dir():
        for path in folder.iterdir():
            match = SEED_RUN.match(path.name)
            if match and match["base"] == name and (path / "params.yaml").is_file():
                found.append((int(match["seed"]), path.name))
    return [member for _, member in sorted(found)]


def load_group(name: str, members: list[str], root: Path = Path("."),
               require_metrics: bool = True) -> dict:
    """The runs of one spec's seeds, as one group named `name`: {"name", "params" (the first
    seed's), "seeds": [run, ...]}."""
    runs = [load_run(member, root, require_metrics) for member in members]
    return {"name": name, "params": runs[0]["params"], "seeds": runs}


def load_runs(name: str, root: Path = Path("."), require_metrics: bool = True) -> dict:
    """The run `name` (see `load_run`) or, when runs/ has no such run but has its seeds'
    runs <name>-s<seed>, their group (`load_group`)."""
    if "@" not in name and not (root / RUNS / name / "params.yaml").is_file():
        members = seed_members(name, root)
        if members:
            return load_group(name, members, root, require_metrics)
    return load_run(name, root, require_metrics)


def members_of(runs: list[dict]) -> list[dict]:
    """Every single run: a group stands for its seeds' runs."""
    return [member for run in runs for member in run.get("seeds", [run])]


def mean_std(values: list) -> tuple[float, float] | None:
    """The mean and the sample standard deviation (n - 1; 0 for one value) of `values`; None
    unless every value is a number (a figure some seed lacks is not averaged)."""
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool)
                             for v in values):
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_results(group: dict) -> tuple[list[dict], list[str]]:
    """Each seed's results ({label: value}) and every label in reading order."""
    results = [dict(result_rows(member["metrics"])) for member in group["seeds"]]
    return results, list(dict.fromkeys(label for res in results for label in res))


def _mean_std_text(values: list) -> str:
    found = mean_std(values)
    return "-" if found is None else f"{_fmt(found[0])} ± {_fmt(found[1])}"


def run_summary(run: dict) -> str:
    """The end-of-run table of a run, or of a group of seeds."""
    return group_table(run) if "seeds" in run else summary_table(run)


def group_table(group: dict) -> str:
    """The seeds of one spec: every result as mean ± std, then each seed's value."""
    runs, params = group["seeds"], group["params"]
    seeds = [run["params"]["seed"] for run in runs]
    results, labels = seed_results(group)
    header = ["", f"mean ± std (n={len(runs)})", *(f"seed {seed}" for seed in seeds)]
    rows = [[label, _mean_std_text([res.get(label) for res in results]),
             *(_fmt(res.get(label)) for res in results)] for label in labels]
    scope = "compression" if params.get("shared_seed") is not None else "all"
    lines = [f"{group['name']}: {len(runs)} seeds ({', '.join(map(str, seeds))}), "
             f"{params['task']}, {params['prune']['mode']} pruning to "
             f"{params['prune']['target_sparsity']:.0%}",
             f"  {SCOPE_TEXT[scope]}"]
    lines += ["  " + line for line in render(header, rows, "table").splitlines()]
    warned = [f"  warning: seed {seed}: {line}" for seed, run in zip(seeds, runs, strict=True)
              for line in run["metrics"].get("warnings", [])]
    return "\n".join(lines + warned)


def _file_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _json(text: str | None, where: str) -> dict | None:
    """`text` parsed as JSON (None stays None); an error names `where`."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvlmError(f"{where}: invalid JSON ({e})") from None


def load_run_at(ref: str, root: Path = Path("."), require_metrics: bool = True) -> dict:
    """`NAME@REV`: run NAME's params.yaml, metrics.json and masks.json as git revision REV
    holds them.

    All are git-tracked (see .gitignore), so a commit records a finished run's results; the
    run is named `ref` in tables. Errors name the revision or the missing file.
    """
    name, _, rev = ref.partition("@")
    if not name or not rev or rev.startswith("-"):
        raise EvlmError(f"{ref}: expected NAME@REV, a run name and a git revision "
                        "(e.g. vqa_50pct@HEAD~3)")
    found = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root)
    if found.returncode:
        why = found.stderr.strip().splitlines()[-1] if found.stderr.strip() else (
            f"no commit {rev!r} in this repository")
        raise EvlmError(f"{ref}: {why}")
    commit = found.stdout.strip()
    folder = RUNS / name

    def committed(path: Path) -> str | None:
        shown = _git(["show", f"{commit}:./{path.as_posix()}"], root)
        return None if shown.returncode else shown.stdout

    params_text = committed(folder / "params.yaml")
    if params_text is None:
        raise EvlmError(f"{ref}: revision {rev} ({commit[:10]}) has no run {name} "
                        f"({folder / 'params.yaml'} is not committed there)")
    metrics_path = folder / FINAL_KIND / "metrics.json"
    metrics_text = committed(metrics_path)
    if metrics_text is None and require_metrics:
        raise EvlmError(f"{ref}: {metrics_path} is not committed at revision {rev} "
                        f"({commit[:10]}): the run had not finished there")
    return {"name": ref, "params": yaml.safe_load(params_text),
            "metrics": _json(metrics_text, f"{ref}: {metrics_path} at {rev}"),
            "masks": _json(committed(folder / MASKS), f"{ref}: {folder / MASKS} at {rev}")}


def _git(args: list[str], root: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        raise EvlmError("NAME@REV needs git, which is not on PATH") from None


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


def show_text(run: dict, status: dict[str, list[str]]) -> str:
    """`evlm show`: key settings, each stage's status, then the summary table when finished
    (of a group of seeds: the first seed's settings and every seed's stages)."""
    lines = [f"{run['name']}", "  settings"]
    lines += [f"    {label:<16}{value}" for label, value in key_settings(run["params"])]
    lines.append("  stages")
    width = max((len(stage) for stage in status), default=0) + 2
    for stage, reasons in status.items():
        lines.append(f"    {stage:<{width}}" + ("up to date" if not reasons else
                                                "would rerun: " + "; ".join(reasons)))
    lines.append("")
    finished = all(member["metrics"] for member in members_of([run]))
    lines.append(run_summary(run) if finished else
                 "  no metrics yet: `evlm run` its spec to finish the run")
    for member in members_of([run]):
        if member.get("masks"):
            lines += ["", *([f"  {member['name']}"] if "seeds" in run else []),
                      *allocation_lines(member["masks"])]
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


def result_rows(m: dict) -> list[tuple[str, object]]:
    """(label, value) rows of a run's results, in reading order."""
    rows = [(m["metric"], m["value"]), (f"teacher {m['metric']}", m["teacher_value"]),
            ("retention", m["retention"]),
            ("params (M)", m["params"] / 1e6), ("teacher params (M)", m["teacher_params"] / 1e6),
            ("GFLOPs / example", m["gflops_per_example"]),
            ("teacher GFLOPs / example", m["teacher_gflops_per_example"])]
    for group in DETAILS:
        for key, value in m.get(group, {}).items():
            rows += [(key, value), (f"teacher {key}", m[f"teacher_{group}"][key])]
    for label, times, speedups in TIMINGS:
        for bs, lat in m.get(times, {}).items():
            batch = bs.replace("_", " ")
            rows.append((f"{label} {batch} (ms)", lat["student"]))
            rows.append((f"teacher {label} {batch} (ms)", lat["teacher"]))
            rows.append(((f"{label} speedup" if label != "latency" else "speedup") + f" {batch}",
                         m[speedups][bs]))
    if "dense_value" in m:
        rows += [(f"dense {m['metric']}", m["dense_value"]),
                 ("dense retention", m["dense_retention"])]
    if "dense_params" in m:
        rows += [("dense params (M)", m["dense_params"] / 1e6),
                 ("dense GFLOPs / example", m["dense_gflops_per_example"])]
    for bs, split in m.get("speedup_split", {}).items():
        batch = bs.replace("_", " ")
        rows += [(f"dense latency {batch} (ms)", m["latency_ms"][bs]["dense_student"]),
                 (f"speedup from depth {batch}", split["depth"]),
                 (f"speedup from pruning {batch}", split["pruning"]),
                 (f"speedup / FLOPs ratio {batch}", split["over_flops_ratio"])]
    rows.append(("sparsity overall", m["sparsity"]["overall"]))
    rows += [(f"sparsity {e}", m["sparsity"].get(e)) for e in ENCODERS]
    return rows


def summary_table(run: dict) -> str:
    """The end-of-run table: teacher, dense distilled student (when measured) and pruned
    student side by side, then speed split into depth and pruning, and sparsity."""
    m = run["metrics"]
    dense = "dense_params" in m  # runs evaluated before the dense student was timed lack it

    def row(label: str, teacher, dense_value, student, spec: str, tail: str = "") -> str:
        cells = [teacher, *([dense_value] if dense else []), student]
        return f"  {label:<24}" + "".join(f"{c:>12{spec}}" if isinstance(c, float) else f"{c:>12}"
                                          for c in cells) + tail

    lines = [f"{run['name']}: {run['params']['task']}, {run['params']['prune']['mode']} pruning "
             f"to {run['params']['prune']['target_sparsity']:.0%}",
             row("", "teacher", "dense", "student", ""),
             row(m["metric"], m["teacher_value"], m.get("dense_value", "-"), m["value"], ".4f",
                 f"   retention {m['retention']:.1%}" + (
                     f" (dense {m['dense_retention']:.1%})" if "dense_value" in m else "")),
             *detail_lines(m, dense),
             row("params (M)", m["teacher_params"] / 1e6, m.get("dense_params", 0) / 1e6,
                 m["params"] / 1e6, ".2f"),
             row("GFLOPs / example", m["teacher_gflops_per_example"],
                 m.get("dense_gflops_per_example", 0.0), m["gflops_per_example"], ".3f")]
    for name, times, speedups in TIMINGS:
        for bs, lat in m.get(times, {}).items():
            label = f"{name} {bs.replace('_', ' ')} (ms)"
            lines.append(row(label, lat["teacher"], lat.get("dense_student", "-"), lat["student"],
                             ".2f", f"   speedup {m[speedups][bs]:.2f}x"))
    for bs, split in m.get("speedup_split", {}).items():
        lines.append(f"  {'speedup ' + bs.replace('_', ' '):<24}depth {split['depth']:.2f}x "
                     f"x pruning {split['pruning']:.2f}x = {m['speedup'][bs]:.2f}x; "
                     f"{split['over_flops_ratio']:.2f} of the FLOPs ratio (pruning alone "
                     f"{split['pruning_over_flops_ratio']:.2f})")
    sp = m["sparsity"]
    lines.append(row("sparsity (prunable)", "", "", sp["overall"], ".3f", "   " + ", ".join(
        f"{e} {sp[e]:.3f}" for e in ENCODERS if e in sp)))
    lines += [f"  warning: {line}" for line in m.get("warnings", [])]
    if "size_bytes" in m:
        lines.append(row("file size (MB)", m["teacher_size_bytes"] / 1e6, "-",
                         m["size_bytes"] / 1e6, ".2f"))
    lines += exported_rows(m)
    return "\n".join(lines)


def detail_lines(m: dict, dense: bool = False) -> list[str]:
    """The task's other measures, teacher next to student: each recall (retrieval), each
    caption metric (captioning); with `dense`, a "-" for the unscored dense student."""
    recalls = [(key.upper().replace("_R", "@"), m["teacher_recall"][key], value)
               for key, value in m.get("recall", {}).items() if "_r" in key]
    captions = [(label, m["teacher_scores"][key], m["scores"][key])
                for key, label in CAPTION_LABELS.items() if key in m.get("scores", {})]
    middle = f"{'-':>12}" if dense else ""
    return [f"  {label:<24}{teacher:>12.4f}{middle}{student:>12.4f}"
            for label, teacher, student in recalls + captions]


def exported_rows(m: dict) -> list[str]:
    """The exported student, one row per file (the int8 row never replaces the fp32 one), timed
    next to the teacher exported the same way: the speedups compare like with like."""
    if not m.get("exported"):
        return []
    batches = list(m["latency_ms"])
    head = "".join(f"{'ms ' + bs.replace('batch_', 'b'):>10}{'speedup':>9}" for bs in batches)
    lines = ["", f"  {'student, ONNX Runtime':<24}{'metric':>10}{'retention':>11}"
             f"{head}{'MB':>8}"]
    teacher = "teacher_onnx_fp32"  # evaluate's row; runs evaluated before it was timed lack it
    if teacher in m["latency_ms"][batches[0]]:
        cells = "".join(f"{m['latency_ms'][bs][teacher]:>10.2f}{'':>9}" for bs in batches)
        lines.append(f"  {'teacher fp32':<24}{'-':>10}{'-':>10} {cells}")
    for name, e in m["exported"].items():
        cells = "".join(f"{m['latency_ms'][bs][name]:>10.2f}{e['speedup'][bs]:>8.2f}x"
                        for bs in batches)
        lines.append(f"  {name.replace('onnx_', ''):<24}{e['value']:>10.4f}{e['retention']:>10.1%} "
                     f"{cells}{e['size_bytes'] / 1e6:>8.2f}")
    fp32 = m["exported"].get("onnx_fp32", {})
    if "over_flops_ratio" in fp32:
        lines.append("  fp32 student over the teacher: " + ", ".join(
            f"{ratio:.2f} of the FLOPs ratio at {bs.replace('_', ' ')}"
            for bs, ratio in fp32["over_flops_ratio"].items()))
    return lines


def diff_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every result, then every param that differs between the runs.

    Results line up by label, so runs measured at different latency batch sizes show "-" where
    one has no figure.
    """
    columns = [column for r in runs for column in _columns(r)]
    header = ["", *(name for name, _, _ in columns)]
    labels = list(dict.fromkeys(label for _, res, _ in columns for label in res))
    rows = [[label, *(res.get(label, "-") for _, res, _ in columns)] for label in labels]
    flat = [f for _, _, f in columns]
    keys = sorted(set().union(*flat) - {"name", "shared_seed"})
    rows += [[k, *(_fmt(f.get(k)) for f in flat)] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    return header, rows


def _columns(run: dict) -> list[tuple[str, dict[str, str], dict]]:
    """(header, label -> shown result, flat params) per column: one for a run; for a group of
    seeds, mean ± std first, then one per seed."""
    if "seeds" not in run:
        return [(run["name"], {k: _fmt(v) for k, v in result_rows(run["metrics"])},
                 _flatten(run["params"]))]
    singles = [column for member in run["seeds"] for column in _columns(member)]
    results, labels = seed_results(run)
    summary = {label: _mean_std_text([res.get(label) for res in results]) for label in labels}
    flat = {**_flatten(run["params"]),
            "seed": ",".join(str(member["params"]["seed"]) for member in run["seeds"])}
    return [(f"{run['name']} (mean ± std, n={len(run['seeds'])})", summary, flat), *singles]


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) for r in [header, *rows])


def diff_json(runs: list[dict]) -> str:
    """Each run's metrics and params; a group of seeds as its seeds' runs and, per result,
    {"mean", "std"}."""
    out = {}
    for r in runs:
        if "seeds" not in r:
            out[r["name"]] = {"metrics": r["metrics"], "params": r["params"]}
            continue
        results, labels = seed_results(r)
        summary = {}
        for label in labels:
            found = mean_std([res.get(label) for res in results])
            if found is not None:
                summary[label] = {"mean": found[0], "std": found[1]}
        out[r["name"]] = {"seeds": [member["name"] for member in r["seeds"]],
                          "mean_std": summary,
                          "runs": {member["name"]: {"metrics": member["metrics"],
                                                    "params": member["params"]}
                                   for member in r["seeds"]}}
    return json.dumps(out, indent=2)
