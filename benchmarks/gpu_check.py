"""The CUDA path, checked in one go: a tiny spec on the GPU in bf16, in one process and then in
two (when two GPUs exist), exported and evaluated; the figures printed.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu      # the same steps on the CPU, in fp32 (--bf16 for
                                              # bf16): known to run before a GPU is there

`benchmarks/gpu_check.sh` installs evlm first where it is not installed. Each run goes into a
fresh folder under --out (a temporary one by default). The check fails (exit 1) when a run
fails, when evaluate did not time on the device it was meant to, or when the 2-process run's
student differs from the 1-process one by more than bf16's rounding. It prints each stage's
wall time, the latencies (fp32 and bf16 on CUDA, CPU beside them), the metrics, and every
kernel torch warned has no deterministic version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/specs/tiny_vqa.yaml"
# What torch prints for a kernel with no deterministic version (warn_only mode).
NONDETERMINISTIC = re.compile(r"UserWarning: (\S+) does not have a deterministic implementation")
# Two runs of one spec on 1 and 2 processes reduce in another order; in bf16 the trained
# weights then differ by rounding, not by more than this share of the accuracy.
ACCURACY_SPREAD = 0.05


def spec_for(device: str, processes: int, bf16: bool = True) -> dict:
    """The tiny VQA spec on `device`, trained in bf16 (or fp32), timed at batch 1 and 32 (and
    on the CPU beside a GPU), exported to ONNX."""
    spec = yaml.safe_load(TINY.read_text())
    spec.update(name=f"gpu_check_{processes}p", device=device,
                precision="bf16" if bf16 else "fp32")
    # on the CPU one thread a process: two processes of two would crowd a 2-core machine
    spec["resources"] = {"processes": processes, "threads": 2 if device == "cuda" else 1}
    steps = 40 if device == "cuda" else 8  # the CPU mode checks the path, not the figures
    for section in ("pretrain", "task_teacher", "distill", "prune", "finetune"):
        spec[section]["train"].update(max_steps=steps, batch_size=32, checkpoint_every=steps // 2)
    spec["evaluate"]["latency"] = {"batch_sizes": [1, 32], "repeats": 20, "warmup": 3,
                                   "threads": 2, "cpu": True}
    return spec


def run(folder: Path, spec: dict) -> tuple[dict, float, str]:
    """`evlm run` of `spec` in `folder`: (its evaluate results, wall seconds, its output)."""
    (folder / "specs").mkdir(parents=True)
    path = folder / "specs" / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "evlm_cli", "run", str(path.relative_to(folder))],
                          cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode:
        print(output[-6000:])
        raise SystemExit(f"gpu_check: `evlm run` failed in {folder} (exit {done.returncode})")
    metrics = json.loads((folder / f"runs/{spec['name']}/evaluate/metrics.json").read_text())
    return metrics, seconds, output


def stage_seconds(output: str) -> list[tuple[str, int]]:
    """Each stage's wall time, as evlm's stage entry reports it."""
    return [(m[1], int(m[2])) for m in re.finditer(r"stage (\w+) done in (\d+)s", output)]


def report(name: str, metrics: dict, seconds: float, output: str) -> None:
    timing = metrics["timing"]
    print(f"\n== {name}: {seconds:.0f} s; stages: "
          + ", ".join(f"{kind} {s} s" for kind, s in stage_seconds(output)))
    print(f"  {metrics['metric']}: teacher {metrics['teacher']['score']['value']:.4f}, "
          f"student {metrics['student']['score']['value']:.4f}")
    print(f"  timed on {timing['device']} ({timing['threads']} CPU threads, "
          f"{'contended' if timing['contended'] else 'alone'})")
    for setting, ms in metrics["latency_ms"].items():
        cells = ", ".join(f"{model} {value:.2f}" for model, value in ms.items() if value is not None)
        print(f"  {setting:<16} ms: {cells}")
    for file, e in metrics["exported"].items():
        print(f"  {file}: {metrics['metric']} {e['value']:.4f}, speedup over the faster teacher "
              + ", ".join(f"{v:.2f}x at {bs}" for bs, v in e["speedup_over_fastest_teacher"].items()))
    kernels = sorted(set(NONDETERMINISTIC.findall(output)))
    print("  kernels without a deterministic version: " + (", ".join(kernels) or "none"))


def check(metrics: dict, device: str) -> list[str]:
    """What must hold of a run's results on `device`."""
    problems = []
    timing, settings = metrics["timing"], set(metrics["latency_ms"])
    if device == "cuda":
        if timing["device"] == "cpu":
            problems.append("evaluate timed on the CPU, not on the GPU")
        for wanted in ("batch_1", "batch_1_bf16", "cpu_batch_1"):
            if wanted not in settings:
                problems.append(f"no {wanted} latency row")
    elif timing["device"] != "cpu":
        problems.append(f"evaluate timed on {timing['device']}, not on the CPU")
    if not metrics["exported"]:
        problems.append("no exported file was evaluated")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU needed)")
    parser.add_argument("--bf16", action="store_true",
                        help="with --cpu, train in bf16 too (slow on a CPU without bf16 units)")
    parser.add_argument("--processes", type=int, default=None,
                        help="the most processes to try (default: 2 on two or more GPUs, else 1)")
    parser.add_argument("--out", type=Path, default=None, help="where the run folders go")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (use --cpu to check the CPU path)")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    most = args.processes or (2 if gpus >= 2 else 1)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          + (", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) or "no GPU"))
    out = args.out or Path(tempfile.mkdtemp(prefix="evlm-gpu-check-"))
    problems, values = [], {}
    for processes in range(1, most + 1):
        name = f"{processes} process{'es' if processes > 1 else ''} on {device}"
        spec = spec_for(device, processes, bf16=device == "cuda" or args.bf16)
        metrics, seconds, output = run(out / f"{processes}p", spec)
        report(name, metrics, seconds, output)
        problems += [f"{name}: {p}" for p in check(metrics, device)]
        values[processes] = metrics["student"]["score"]["value"]
    if len(values) > 1 and abs(values[1] - values[most]) > ACCURACY_SPREAD:
        problems.append(f"1 and {most} processes trained students {values[1]:.4f} and "
                        f"{values[most]:.4f} apart")
    print(f"\nrun folders: {out}")
    for problem in problems:
        print(f"FAILED: {problem}")
    print("gpu_check: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
