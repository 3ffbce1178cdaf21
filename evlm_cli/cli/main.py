"""The `evlm` command line: run, validate, compile, diff and show compression specs."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import click

from evlm_cli.core.config import params_from_dict
from evlm_cli.core.errors import EvlmError
from evlm_cli.core.layout import RUNS
from evlm_cli.core.results import EvaluateResults
from evlm_cli.pipeline.compile import compile_specs as compile_specs_to_dvc
from evlm_cli.pipeline.compile import plan, write_code_fingerprints
from evlm_cli.pipeline.registry import FINAL_KIND, KINDS
from evlm_cli.pipeline.remote import check_remote
from evlm_cli.pipeline.runner import (
    StageFailed,
    ensure_dvc_project,
    project_lock,
    repro,
    stage_status,
)
from evlm_cli.report.diff import diff_json, diff_rows
from evlm_cli.report.runs import (
    BENCH,
    SeedGroup,
    evaluate_digest,
    load_group,
    load_run,
    load_runs,
    members_of,
    read_params,
)
from evlm_cli.report.show import show_text
from evlm_cli.report.summary import render, run_summary
from evlm_cli.spec.load import load_spec, seed_runs
from evlm_cli.spec.schema import load_schema

# click's own usage errors already exit with 2; ours match them.
EXIT_USER_ERROR = 2


class EvlmGroup(click.Group):
    """A click group that turns any EvlmError into its message lines and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EvlmError as error:
            if ctx.params.get("debug"):
                traceback.print_exc()
            for line in str(error).splitlines():
                click.echo(line, err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=EvlmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Print a traceback along with any error.")
@click.version_option(package_name="evlm")
def main(debug: bool) -> None:
    """Compress vision-language models with the EfficientVLM recipe.

    A YAML spec (the JSON Schema evlm_cli/spec/spec.schema.json says every key) says
    what to compress and how; it compiles into a DVC pipeline: prepare, teacher, distil,
    modal-adaptive L0 pruning, physical slicing, fine-tuning and evaluation.
    """


def load_specs(paths: tuple[str, ...]) -> list[dict]:
    """Load every spec, reporting the problems of all of them together."""
    specs, errors = [], []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except EvlmError as error:
            errors.append(error)
    raise_together(errors)
    return specs


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` as a list of seeds; None when not given."""
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise EvlmError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise EvlmError(f"--seeds {text}: the seeds must be distinct and not negative")
    return seeds


def expand_seeds(specs: list[dict], seeds: list[int] | None) -> list[list[dict]]:
    """Each spec's runs: itself, or one per seed (`--seeds`, else the spec's `seeds`)."""
    return [seed_runs(spec, seeds) for spec in specs]


SEEDS_HELP = ("Comma-separated seeds: one run per seed, named <name>-s<seed> (overrides the "
              "spec's `seeds`; its `seed_scope` says what they vary).")


def raise_together(errors: list[EvlmError]) -> None:
    """One EvlmError with every message; chained to the first so --debug shows where it arose."""
    if errors:
        raise EvlmError("\n".join(str(error) for error in errors)) from errors[0]


@main.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
def validate(specs: tuple[str, ...]) -> None:
    """Check each SPEC against the schema and the semantic rules.

    Prints one OK line per valid spec. Otherwise prints one line per problem, naming the
    file, the line and the key, and exits with status 2. Writes nothing.
    """
    errors = []
    for path in specs:
        try:
            spec = load_spec(path)
        except EvlmError as error:
            errors.append(error)
            continue
        click.echo(f"OK {path} (name: {spec['name']}, task: {spec['task']})")
    raise_together(errors)


@main.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--force", is_flag=True, help="Rerun every stage even if nothing changed.")
@click.option("--seeds", "seeds_text", metavar="S,S,...", help=SEEDS_HELP)
@click.option("--remote", metavar="NAME",
              help="Share finished stages through the DVC remote NAME: before each stage, take "
                   "it from there if a machine sharing NAME has finished it with the same "
                   "inputs; after it, push it there. Two checkouts can split a sweep so.")
def run(specs: tuple[str, ...], force: bool, seeds_text: str | None,
        remote: str | None) -> None:
    """Validate, compile into dvc.yaml, run `dvc repro` and print a summary table.

    Stages whose inputs did not change are not rerun; stages shared by several specs
    (same data, teacher and distillation settings) run once. With seeds, the table gives
    each figure's mean and standard deviation over the seeds, and each seed's.
    """
    seeds = parse_seeds(seeds_text)
    loaded = load_specs(specs)  # before anything is written
    if remote is not None:
        check_remote(remote)
    groups = expand_seeds(loaded, seeds)
    resolved = [run_spec for group in groups for run_spec in group]
    with project_lock():
        initialised = ensure_dvc_project(Path("."))
        if initialised:
            click.echo(f"evlm run: {initialised}")
        compile_specs_to_dvc(resolved)
        names = [s["name"] for s in resolved]
        log = RUNS / (names[0] if len(names) == 1 else "_multi") / "run.log"
        try:
            repro([f"{n}-{FINAL_KIND}" for n in names], log, force=force, remote=remote)
        except StageFailed as failed:
            click.echo(f"evlm run: {failed}", err=True)
            click.get_current_context().exit(1)
        except KeyboardInterrupt:
            click.echo("evlm run: interrupted; stages stopped. Run again to resume.", err=True)
            click.get_current_context().exit(130)
    for spec, group in zip(loaded, groups, strict=True):
        click.echo("")
        click.echo(run_summary(load_group(spec["name"], [run_spec["name"] for run_spec in group])
                               if len(group) > 1 else load_run(group[0]["name"])))


@main.command("compile")
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--seeds", "seeds_text", metavar="S,S,...", help=SEEDS_HELP)
def compile_specs(specs: tuple[str, ...], seeds_text: str | None) -> None:
    """Write runs/<name>/params.yaml and merge each SPEC's stages into dvc.yaml.

    Stages of specs not named here are left in place, so `dvc repro` keeps working on them.
    """
    seeds = parse_seeds(seeds_text)
    groups = expand_seeds(load_specs(specs), seeds)
    resolved = [run_spec for group in groups for run_spec in group]
    with project_lock():
        plans = compile_specs_to_dvc(resolved)
    for stages in plans:
        click.echo(f"{stages[-1].name.rsplit('-', 1)[0]}: " + ", ".join(s.name for s in stages))
    click.echo("wrote dvc.yaml")


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write a PNG: the task metric against latency at each batch size "
                   "(the Pareto view; seeds as mean ± std), and sparsity per encoder.")
def diff(runs: tuple[str, ...], fmt: str, plot_path: str | None) -> None:
    """Compare runs side by side: params, metric, retention, sparsity per modality, speed.

    Each RUN is a run name (a folder under runs/), a spec file, or NAME@REV: the run as
    committed at a git revision (its params.yaml and metrics.json are git-tracked), e.g.
    `evlm diff vqa_50pct@HEAD~3 vqa_50pct`.
    """
    names = [spec["name"] for spec in load_specs(tuple(r for r in runs if is_spec_file(r)))]
    names = iter(names)
    loaded = [load_runs(next(names) if is_spec_file(r) else r) for r in runs]
    if fmt == "json":
        click.echo(diff_json(loaded))
    else:
        click.echo(render(*diff_rows(loaded), fmt))
    if plot_path:
        from evlm_cli.report.plots import pareto  # loads matplotlib; the tables do not

        click.echo(f"wrote {pareto(loaded, Path(plot_path))}")


@main.command()
@click.argument("target", metavar="SPEC_OR_RUN")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write a PNG: the per-layer allocation of each encoder side by side, "
                   "and every stage's training curves from its log.csv.")
def show(target: str, plot_path: str | None) -> None:
    """Show one run: its resolved spec's key settings, stage status, metrics and the
    per-layer allocation of kept heads and FFN neurons.

    SPEC_OR_RUN is a spec file or a run name (a folder under runs/). The status says which
    stages are up to date and which `evlm run` would rerun, and why.
    """
    spec = load_specs((target,))[0] if is_spec_file(target) else None
    run = load_runs(spec["name"] if spec else target, require_metrics=False)
    write_code_fingerprints()  # so the status sees code edited since the last compile
    stages = list(dict.fromkeys(s.name for member in run.members for s in plan(member.params)))
    click.echo(show_text(run, stage_status(stages)))
    if plot_path:
        from evlm_cli.report.plots import run_plot  # loads matplotlib; the text does not

        members = run.members
        logs = {s.name: path for member in members for s in plan(member.params)
                for path in s.paths("plots")}
        click.echo(f"wrote {run_plot(members[0], logs, Path(plot_path))}"
                   + (f" (allocation of {members[0].name})" if len(members) > 1 else ""))
    # A group of seeds is compared through its first seed's run of the spec.
    expected = (seed_runs(spec, [run.params["seed"]])[0]
                if spec is not None and isinstance(run, SeedGroup) else spec)
    if spec is not None and expected != run.params:
        click.echo(f"\n{target} differs from the compiled {RUNS / run.name / 'params.yaml'}: "
                   "the status above is the compiled one's; `evlm run` it to recompile")


# `evlm export` takes the spec's export settings as options: the schema's defaults and bounds.
EXPORT_KEYS = load_schema()["properties"]["export"]["properties"]


@main.command("export")
@click.argument("run_name", metavar="RUN")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write model.onnx (and model.int8.onnx) and export.json into.")
@click.option("--opset", default=EXPORT_KEYS["opset"]["default"], show_default=True,
              type=click.IntRange(EXPORT_KEYS["opset"]["minimum"], EXPORT_KEYS["opset"]["maximum"]),
              help=EXPORT_KEYS["opset"]["description"])
@click.option("--int8/--no-int8", default=EXPORT_KEYS["int8"]["default"], show_default=True,
              help=EXPORT_KEYS["int8"]["description"])
def export_run(run_name: str, out_dir: str, opset: int, int8: bool) -> None:
    """Export a finished run's fine-tuned student to ONNX, checked against PyTorch.

    RUN is a run name (a folder under runs/) or a spec file. The graph takes images, token
    ids and the attention mask, with batch size and text length free, and returns the task
    logits. Needs the optional packages: pip install 'evlm[export]'.
    """
    name = load_specs((run_name,))[0]["name"] if is_spec_file(run_name) else run_name
    params = read_params(name)  # export needs no results, of any schema
    stages = {s.kind.name: s for s in plan(params)}
    student, prepared = stages["finetune"].outputs["model"], stages["prepare"].outputs["data"]
    for path in (student, prepared):
        if not path.exists():
            raise EvlmError(f"{path}: missing; the run has not finished (evlm run its spec)")
    from evlm_cli.recipe.export import export_student  # loads torch; --help does not

    summary = export_student(student, prepared, params["task"], opset, int8, Path(out_dir))
    for variant, file in summary["files"].items():
        click.echo(f"wrote {Path(out_dir) / file} ({variant}, "
                   f"{summary['size_bytes'][variant] / 1e6:.2f} MB)")
    click.echo(f"fp32 ONNX vs PyTorch: max abs difference {summary['parity_max_abs_diff']:.1e}")


@main.command("bench")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
def bench_runs(runs: tuple[str, ...]) -> None:
    """Time finished runs again, alone, every model interleaved in one process.

    Each RUN (a name under runs/, a spec file, or a spec's group of seeds) is timed as its
    evaluate stage times it: teacher, dense student, student and the exported files, with its
    evaluate.latency threads and batch sizes. All of them run in the same rounds, so their
    figures compare like for like. The figures go to runs/NAME/bench.json with how loaded the
    machine was, and every table (`evlm show`, `evlm diff`, the run summary) shows them in
    place of evaluate's until evaluate reruns. Run it on an otherwise idle machine.
    """
    members = [run for name in runs for run in members_of([load_runs(
        load_specs((name,))[0]["name"] if is_spec_file(name) else name)])]
    from evlm_cli.recipe.bench import Benched, bench  # loads torch; --help does not

    targets = []
    for run in members:
        if "@" in run.name:
            raise EvlmError(f"{run.name}: evlm bench times runs in this checkout, not at a "
                            "git revision")
        evaluate = {s.kind.name: s for s in plan(run.params)}[FINAL_KIND]
        missing = [p for p in evaluate.inputs.values() if not p.exists()]
        if missing:
            raise EvlmError(f"{missing[0]}: missing; rerun `evlm run` for {run.name} (DVC "
                            "keeps it in its cache: `dvc checkout` restores it)")
        metrics = evaluate.outputs["metrics"]
        text = metrics.read_text()
        targets.append(Benched(
            name=run.name, params=params_from_dict(run.params, KINDS[FINAL_KIND].sections),
            **evaluate.inputs, results=EvaluateResults.from_json(json.loads(text), str(metrics)),
            evaluate_sha256=evaluate_digest(text), out=RUNS / run.name / BENCH))
    bench(targets)
    for target in targets:
        click.echo(f"\n{run_summary(load_run(target.name))}\nwrote {target.out}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("kind", required=False, metavar="KIND")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def stage(kind: str | None, args: tuple[str, ...]) -> None:
    """Run one DVC stage of KIND (what dvc.yaml's commands call).

    The arguments are `--params FILE` and one `--NAME PATH` per input and output of the
    kind, as evlm_cli/pipeline/registry.py declares them; `evlm stage KIND --help` lists them.
    """
    ctx = click.get_current_context()
    if kind in (None, "-h", "--help"):
        click.echo(ctx.get_help())
        click.echo("\nKinds:\n" + "\n".join(f"  {k.name:<18}{k.doc}" for k in KINDS.values()))
        ctx.exit(0 if kind else EXIT_USER_ERROR)
    if kind not in KINDS:
        raise EvlmError(f"evlm stage: unknown kind {kind!r} (expected one of: {', '.join(KINDS)})")
    from evlm_cli.pipeline.entry import (
        run_stage,  # the stage's own imports load torch, --help does not
    )

    ctx.exit(run_stage(kind, list(args)))


def is_spec_file(argument: str) -> bool:
    return argument.endswith((".yaml", ".yml")) or Path(argument).is_file()
