"""What every stage script shares: arguments, the params file, one-line errors, a summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

from evlm_cli.errors import EvlmError


def stage_main(name: str, paths: list[str], body: Callable[[dict, argparse.Namespace], dict]) -> None:
    """Parse `--params` and the named path arguments, run `body`, report errors in one line."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"evlm stage: {name}")
    parser.add_argument("--params", required=True, type=Path, help="resolved params YAML")
    for p in paths:
        parser.add_argument(f"--{p}", required=True, type=Path)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        spec = yaml.safe_load(args.params.read_text())
        summary = body(spec, args)
    except (EvlmError, OSError, yaml.YAMLError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: stage {name}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"stage {name}: interrupted; rerun to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    brief = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str))}
    print(f"stage {name} done in {time.perf_counter() - start:.0f}s {json.dumps(brief)}")
