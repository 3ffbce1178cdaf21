"""Statistics over the seeds of one spec: each figure's mean and sample standard deviation."""

from __future__ import annotations

import math
from typing import NamedTuple

from evlm_cli.report.runs import SeedGroup, result_rows


class MeanStd(NamedTuple):
    mean: float
    std: float


def mean_std(values: list) -> MeanStd | None:
    """The mean and the sample standard deviation (n - 1; 0 for one value) of `values`; None
    unless every value is a number (a figure some seed lacks is not averaged)."""
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool)
                             for v in values):
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return MeanStd(mean, 0.0)
    return MeanStd(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))


class SeedFigures(NamedTuple):
    """Each seed's figures ({label: value}), every label in reading order, and each label's
    statistics over the seeds (None where some seed lacks the figure)."""

    per_seed: list[dict[str, float | None]]
    labels: list[str]
    stats: dict[str, MeanStd | None]


def seed_figures(group: SeedGroup) -> SeedFigures:
    """The figures of every seed of `group` (all finished), and their statistics."""
    per_seed = [dict(result_rows(run.results)) for run in group.runs]
    labels = list(dict.fromkeys(label for figures in per_seed for label in figures))
    stats = {label: mean_std([figures.get(label) for figures in per_seed]) for label in labels}
    return SeedFigures(per_seed, labels, stats)
