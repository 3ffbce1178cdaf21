"""The `evlm` command line: run, validate, compile, diff and show compression specs."""

from __future__ import annotations

import traceback
from pathlib import Path

import click

from evlm_cli.errors import EvlmError
from evlm_cli.spec import load_spec

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

    A YAML spec (see specs/vqa_50pct.yaml and schemas/spec.schema.json) says what to
    compress and how; it compiles into a DVC pipeline: prepare, teacher, distil,
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


def raise_together(errors: list[EvlmError]) -> None:
    """One EvlmError with every message; chained to the first so --debug shows where it arose."""
    if errors:
        raise EvlmError("\n".join(str(error) for error in errors)) from errors[0]


def not_yet_implemented(command: str) -> None:
    click.echo(f"evlm {command}: not yet implemented", err=True)
    click.get_current_context().exit(EXIT_USER_ERROR)


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
def run(specs: tuple[str, ...]) -> None:
    """Validate, compile into dvc.yaml, run `dvc repro` and print a summary table.

    Stages whose inputs did not change are not rerun; stages shared by several specs
    (same data, teacher and distillation settings) run once.
    """
    load_specs(specs)
    not_yet_implemented("run")


@main.command("compile")
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
def compile_specs(specs: tuple[str, ...]) -> None:
    """Write runs/<name>/params.yaml and merge each SPEC's stages into dvc.yaml.

    Stages of specs not named here are left in place, so `dvc repro` keeps working on them.
    """
    load_specs(specs)
    not_yet_implemented("compile")


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
def diff(runs: tuple[str, ...]) -> None:
    """Compare runs side by side: params, metric, retention, sparsity per modality, speed.

    Each RUN is a run name (a folder under runs/) or a spec file.
    """
    load_specs(tuple(run for run in runs if is_spec_file(run)))
    not_yet_implemented("diff")


@main.command()
@click.argument("target", metavar="SPEC_OR_RUN")
def show(target: str) -> None:
    """Show one run: its resolved spec, stage status and metrics.

    SPEC_OR_RUN is a spec file or a run name (a folder under runs/).
    """
    if is_spec_file(target):
        load_specs((target,))
    not_yet_implemented("show")


def is_spec_file(argument: str) -> bool:
    return argument.endswith((".yaml", ".yml")) or Path(argument).is_file()
