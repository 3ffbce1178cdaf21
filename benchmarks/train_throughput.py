"""Each training stage's throughput in finished runs, from their log.csv files: examples per
second, the arithmetic rate, and its share of the machine's measured matmul peak (what the
training loop logs), side by side for the runs given.

    python benchmarks/train_throughput.py PROJECT:RUN [PROJECT:RUN ...] [--csv FILE]

e.g. `/tmp/a:vqa_50pct /tmp/a:vqa_50pct_bf16`. The first steps (warm-up, the step whose FLOPs
are counted; `--skip`, 5 by default) are left out; each figure is the median over the rest.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import yaml

from evlm_cli.pipeline.compile import plan

SKIPPED_STEPS = 5
COLUMNS = ("examples_per_s", "gflop_per_s", "peak_share")


def stage_figures(project: Path, run: str, skip: int = SKIPPED_STEPS
                  ) -> dict[str, dict[str, float]]:
    """{training stage kind: {column: median}} of one run's stages that trained."""
    params = yaml.safe_load((project / "runs" / run / "params.yaml").read_text())
    out = {}
    for stage in plan(params):
        if not stage.kind.trains or "log" not in stage.outputs:
            continue
        path = project / stage.outputs["log"]
        if not path.is_file():
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))[skip:]
        if not rows or not all(c in rows[0] for c in COLUMNS):
            continue
        out[stage.kind.name] = {c: statistics.median(float(r[c]) for r in rows) for c in COLUMNS}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="PROJECT:RUN")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    parser.add_argument("--skip", type=int, default=SKIPPED_STEPS,
                        help="steps left out at the start of each stage")
    args = parser.parse_args(argv)
    table = []
    for ref in args.runs:
        project, _, run = ref.rpartition(":")
        for kind, figures in stage_figures(Path(project), run, args.skip).items():
            table.append({"run": run, "stage": kind, **figures})
    print(f"{'run':<22}{'stage':<18}{'examples/s':>12}{'GFLOP/s':>10}{'of peak':>10}")
    for row in table:
        print(f"{row['run']:<22}{row['stage']:<18}{row['examples_per_s']:>12.1f}"
              f"{row['gflop_per_s']:>10.1f}{row['peak_share']:>10.1%}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["run", "stage", *COLUMNS])
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
