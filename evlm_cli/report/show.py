"""`evlm show`: a run's key settings, each stage's status, its summary and the allocation
heatmap (the heads and FFN neurons each layer kept)."""

from __future__ import annotations

from evlm_cli.report.runs import Loaded, SeedGroup
from evlm_cli.report.summary import run_summary

# Shades of the allocation heatmap, from nothing kept to all: a cell's share picks one.
SHADES = " ░▒▓█"
# Unit kinds in the order the heatmap lists them, with their labels.
UNIT_LABELS = {"heads": "heads", "cross_heads": "cross heads", "ffn": "ffn"}


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
