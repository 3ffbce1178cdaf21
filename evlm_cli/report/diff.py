"""`evlm diff`: runs side by side as a table, Markdown or JSON: every result, then every
param that differs."""

from __future__ import annotations

import json

from evlm_cli.report.runs import Loaded, Run, result_rows
from evlm_cli.report.seeds import seed_figures
from evlm_cli.report.summary import fmt, stat_text


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
    rows += [[k, *(fmt(f.get(k)) for f in flat)] for k in keys
             if len({json.dumps(f.get(k)) for f in flat}) > 1]
    return header, rows


def _columns(entry: Loaded) -> list[tuple[str, dict[str, str], dict]]:
    """(header, label -> shown result, flat params) per column: one for a run; for a group of
    seeds, mean ± std first, then one per seed."""
    if isinstance(entry, Run):
        return [(entry.name, {k: fmt(v) for k, v in result_rows(entry.results)},
                 _flatten(entry.params))]
    singles = [column for run in entry.runs for column in _columns(run)]
    figures = seed_figures(entry)
    summary = {label: stat_text(figures.stats[label]) for label in figures.labels}
    flat = {**_flatten(entry.params), "seed": ",".join(map(str, entry.seeds))}
    return [(f"{entry.name} (mean ± std, n={len(entry.runs)})", summary, flat), *singles]


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
