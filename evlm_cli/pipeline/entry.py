"""The entry of every DVC stage: `evlm stage KIND --params FILE --<input> PATH ... --<output> PATH`.

It reads the kind's declaration, builds the typed params of the sections it reads, calls its
run function and turns errors into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import yaml

from evlm_cli.core.config import ConfigError, params_from_dict
from evlm_cli.core.errors import EvlmError
from evlm_cli.core.ranks import is_main
from evlm_cli.pipeline.registry import KINDS
from evlm_cli.training import distributed


def parse(kind_name: str, argv: list[str]) -> argparse.Namespace:
    kind = KINDS[kind_name]
    parser = argparse.ArgumentParser(prog=f"evlm stage {kind.name}",
                                     description=f"evlm stage {kind.name}: {kind.doc}")
    parser.add_argument("--params", required=True, type=Path, help="resolved params YAML")
    for arg in kind.arguments:
        parser.add_argument(f"--{arg}", required=arg not in kind.optional_inputs, type=Path)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def run_stage(kind_name: str, argv: list[str]) -> int:
    """Run one stage of kind `kind_name`; return the process's exit status."""
    kind = KINDS[kind_name]
    args = parse(kind_name, argv)
    start = time.perf_counter()
    try:
        raw = yaml.safe_load(args.params.read_text())
        if not isinstance(raw, dict):
            raise EvlmError(f"{args.params}: not a params mapping")
        try:
            params = params_from_dict(raw, kind.sections)
        except ConfigError as error:
            raise EvlmError(f"{args.params}: {error}") from error
        resources = params.resources
        processes, nodes = (resources.processes, resources.nodes) if resources else (1, 1)
        if kind.trains and distributed.should_relaunch(processes, nodes):
            distributed.relaunch(kind.name, argv, processes, nodes,  # does not return
                                 resources.rendezvous, resources.launcher)
        module, function = kind.run.split(":")
        run = getattr(importlib.import_module(module), function)
        summary = run(params, **{arg: getattr(args, arg) for arg in kind.arguments})
        distributed.shutdown()
    except (EvlmError, OSError, ValueError, yaml.YAMLError) as e:
        # The library raises ValueError for inputs it cannot use (a pruning mode, a layer map)
        if args.debug:
            traceback.print_exc()
        print(f"error: stage {kind.name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stage {kind.name}: interrupted; rerun to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    if not is_main():
        return 0
    brief = {k: v for k, v in (summary or {}).items() if isinstance(v, int | float | str)}
    print(f"stage {kind.name} done in {time.perf_counter() - start:.0f}s {json.dumps(brief)}")
    return 0
