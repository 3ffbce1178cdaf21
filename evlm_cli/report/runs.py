"""Runs and groups of seeds, loaded from runs/ or from a git revision, and their results as
labelled figures (what lines runs and seeds up in tables and statistics)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from evlm_cli.core.config import ENCODERS
from evlm_cli.core.errors import EvlmError
from evlm_cli.core.layout import RUNS
from evlm_cli.core.results import BenchResults, EvaluateResults, retimed
from evlm_cli.pipeline.registry import FINAL_KIND

# The prune stage's account of what it kept, per encoder and layer (`L0Gates.summary`).
MASKS = Path("prune") / "masks.json"
METRICS = Path(FINAL_KIND) / "metrics.json"
# `evlm bench`'s timings of a finished run, beside its stages' folders.
BENCH = Path("bench.json")
# A run of one seed of a spec's `seeds`: <name>-s<seed> (`spec.seed_runs`).
SEED_RUN = re.compile(r"^(?P<base>.+)-s(?P<seed>\d+)$")
# Timed work, teacher next to student, as its rows are labelled. Every task times one pass;
# captioning also whole captions.
PASS, CAPTION = "latency", "caption"


@dataclass(frozen=True)
class Run:
    """One run: its resolved params, its final results (None until evaluate has run) and the
    prune stage's masks (None until prune has run)."""

    name: str
    params: dict
    results: EvaluateResults | None
    masks: dict | None

    @property
    def members(self) -> tuple[Run, ...]:
        return (self,)


@dataclass(frozen=True)
class SeedGroup:
    """The runs of one spec's seeds, read as one: named after the spec, set by the first
    seed's params."""

    name: str
    runs: tuple[Run, ...]

    @property
    def members(self) -> tuple[Run, ...]:
        return self.runs

    @property
    def params(self) -> dict:
        return self.runs[0].params

    @property
    def seeds(self) -> list[int]:
        return [run.params["seed"] for run in self.runs]


Loaded = Run | SeedGroup


def members_of(loaded: list[Loaded]) -> list[Run]:
    """Every single run: a group stands for its seeds' runs."""
    return [run for entry in loaded for run in entry.members]


def load_run(name: str, root: Path = Path("."), require_metrics: bool = True) -> Run:
    """A run's resolved params and final results (None when unfinished and not required).

    `NAME@REV` reads them as committed at git revision REV (`load_run_at`).
    """
    if "@" in name:
        return load_run_at(name, root, require_metrics)
    folder = root / RUNS / name
    params = read_params(name, root)
    metrics_path = folder / METRICS
    metrics_text = _file_text(metrics_path)
    if metrics_text is None and require_metrics:
        raise EvlmError(f"{metrics_path}: missing; the run has not finished (evlm run its spec)")
    results = _results(metrics_text, str(metrics_path), name)
    return Run(name, params, _with_bench(results, metrics_text, _file_text(folder / BENCH),
                                         str(folder / BENCH), name),
               _json(_file_text(folder / MASKS), str(folder / MASKS)))


def evaluate_digest(metrics_text: str) -> str:
    """What a bench file names the evaluate results it retimed by."""
    return hashlib.sha256(metrics_text.encode()).hexdigest()


def _with_bench(results: EvaluateResults | None, metrics_text: str | None,
                bench_text: str | None, where: str, name: str,
                fix: str | None = None) -> EvaluateResults | None:
    """The run's results with `evlm bench`'s timings, when it retimed these very results
    (a rerun of evaluate leaves an older bench file unread)."""
    if results is None or bench_text is None:
        return results
    bench = BenchResults.from_json(_json(bench_text, where), where, f"run {name}",
                                   fix or f"rerun `evlm bench {name}`")
    if bench.evaluate_sha256 != evaluate_digest(metrics_text):
        return results
    return retimed(results, bench)


def read_params(name: str, root: Path = Path(".")) -> dict:
    """A run's resolved params alone (runs/NAME/params.yaml), whatever its results."""
    params_path = root / RUNS / name / "params.yaml"
    if not params_path.is_file():
        raise EvlmError(f"{params_path}: no such run (compile or run its spec first)")
    return yaml.safe_load(params_path.read_text())


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
               require_metrics: bool = True) -> SeedGroup:
    """The runs of one spec's seeds, as one group named `name`."""
    return SeedGroup(name, tuple(load_run(member, root, require_metrics) for member in members))


def load_runs(name: str, root: Path = Path("."), require_metrics: bool = True) -> Loaded:
    """The run `name` (see `load_run`) or, when runs/ has no such run but has its seeds'
    runs <name>-s<seed>, their group (`load_group`)."""
    if "@" not in name and not (root / RUNS / name / "params.yaml").is_file():
        members = seed_members(name, root)
        if members:
            return load_group(name, members, root, require_metrics)
    return load_run(name, root, require_metrics)


def load_run_at(ref: str, root: Path = Path("."), require_metrics: bool = True) -> Run:
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
    metrics_path = folder / METRICS
    metrics_text = committed(metrics_path)
    if metrics_text is None and require_metrics:
        raise EvlmError(f"{ref}: {metrics_path} is not committed at revision {rev} "
                        f"({commit[:10]}): the run had not finished there")
    fix = f"compare a run evaluated since, or read {rev} with the evlm that wrote it"
    results = _results(metrics_text, f"{ref}: {metrics_path} at {rev}", name, fix)
    return Run(ref, yaml.safe_load(params_text),
               _with_bench(results, metrics_text, committed(folder / BENCH),
                           f"{ref}: {folder / BENCH} at {rev}", name, fix),
               _json(committed(folder / MASKS), f"{ref}: {folder / MASKS} at {rev}"))


def result_rows(r: EvaluateResults) -> list[tuple[str, float | str | None]]:
    """(label, value) rows of a run's results, in reading order: what a diff lines up across
    runs, and what seed statistics are taken over (the numbers; "timed by" says who timed and
    whether other processes competed)."""
    teacher, dense, student = r.teacher, r.dense, r.student
    rows = [(r.metric, student.score.value), (f"teacher {r.metric}", teacher.score.value),
            ("retention", student.retention),
            ("params (M)", student.size.params / 1e6),
            ("teacher params (M)", teacher.size.params / 1e6),
            ("GFLOPs / example", student.size.gflops_per_example),
            ("teacher GFLOPs / example", teacher.size.gflops_per_example)]
    for group in ("recall", "caption"):
        theirs = getattr(teacher.score, group) or {}
        for key, value in (getattr(student.score, group) or {}).items():
            rows += [(key, value), (f"teacher {key}", theirs.get(key))]
    for bs, lat in r.latency_ms.items():
        batch = bs.replace("_", " ")
        rows += [(f"{PASS} {batch} (ms)", lat.student), (f"teacher {PASS} {batch} (ms)", lat.teacher),
                 (f"speedup {batch}", r.speedup[bs].total)]
    timing = r.timing
    rows.append(("timed by", f"{timing.taken_by}, {'contended' if timing.contended else 'alone'}"))
    for bs, gen in (r.generation or {}).items():
        batch = bs.replace("_", " ")
        rows += [(f"{CAPTION} {batch} (ms)", gen.student_ms),
                 (f"teacher {CAPTION} {batch} (ms)", gen.teacher_ms),
                 (f"{CAPTION} speedup {batch}", gen.speedup)]
    if dense.value is not None:
        rows += [(f"dense {r.metric}", dense.value), ("dense retention", dense.retention)]
    rows += [("dense params (M)", dense.size.params / 1e6),
             ("dense GFLOPs / example", dense.size.gflops_per_example)]
    for bs, split in r.speedup.items():
        batch = bs.replace("_", " ")
        rows += [(f"dense latency {batch} (ms)", r.latency_ms[bs].dense_student),
                 (f"speedup from depth {batch}", split.depth),
                 (f"speedup from pruning {batch}", split.pruning),
                 (f"speedup / FLOPs ratio {batch}", split.over_flops_ratio)]
    rows.append(("sparsity overall", r.sparsity.overall))
    rows += [(f"sparsity {e}", getattr(r.sparsity, e)) for e in ENCODERS]
    rows += [("expected sparsity at the end", r.sparsity.expected_at_end),
             ("units overruled", r.sparsity.overruled_share)]
    return rows


def _results(text: str | None, where: str, name: str,
             fix: str | None = None) -> EvaluateResults | None:
    data = _json(text, where)
    return None if data is None else EvaluateResults.from_json(data, where, f"run {name}", fix)


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


def _git(args: list[str], root: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        raise EvlmError("NAME@REV needs git, which is not on PATH") from None
