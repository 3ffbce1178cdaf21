"""Where does a pruned student's time go? Speedup next to the FLOPs ratio, and a profile by operator.

For a finished run (its teacher, its fine-tuned student and its prepared data) this prints, at
each batch size:
  - FLOPs per example of teacher and student, and their ratio;
  - the median latency of each, timed interleaved in one process with the same threads (as
    the evaluate stage times them), and the speedup;
  - the speedup divided by the FLOPs ratio: 1.0 means the student runs as fast as its
    arithmetic allows;
  - the top operators by self CPU time (torch.profiler), teacher and student, with their share,
    and the share of each kind of operator: convolution (the stem, never pruned), matmul and
    attention (what pruning narrows), other (what works on the full-width residual stream).
Each model is timed twice, interleaved: as saved ("before") and as `for_inference` prepares
it for timing and export ("after": BatchNorm folded into the stem, fused projections, FFN
widths padded to a multiple of 16, empty sublayers folded into earlier biases).

    .venv/bin/python benchmarks/profile_speed.py --run runs/vqa_50pct --out profile.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from evlm_cli.compress.measure import count_flops, measure_latency
from evlm_cli.data.loader import PreparedData
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import TaskLogits, for_inference
from evlm_cli.pipeline.compile import plan
from evlm_cli.recipe.scoring import fixed_batch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True,
                   help="a finished run's folder, runs/<name>, in a compiled project")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=5, help="operators listed per model")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p.parse_args(argv)


def run_paths(run: Path) -> tuple[Path, Path, Path, str]:
    """The teacher, the fine-tuned student, the prepared data and the task of a run."""
    import yaml

    params = yaml.safe_load((run / "params.yaml").read_text())
    stages = {s.kind.name: s for s in plan(params)}
    return (stages["teacher"].outputs["model"], stages["finetune"].outputs["model"],
            stages["prepare"].outputs["data"], params["task"])


# What FLOPs count and what they do not. Structured pruning narrows matmuls and attention;
# the conv stem is not pruned; the rest (LayerNorms, residual additions, activations, copies,
# embeddings) works on the residual stream, which pruning leaves at full width, and FLOP
# counts give it almost nothing.
OPERATOR_KINDS = {"convolution": ("convolution",),
                  "matmul and attention": ("addmm", "mm", "bmm", "matmul", "linear",
                                           "scaled_dot_product")}


def kind_of(op: str) -> str:
    return next((kind for kind, names in OPERATOR_KINDS.items()
                 if any(name in op for name in names)), "other")


def operator_profile(forward, inputs, threads: int, top: int, passes: int = 5) -> dict:
    """Over `passes` forward passes: the `top` operators by self CPU time with their share, and
    the share of each kind of operator (`OPERATOR_KINDS`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            forward(*inputs)  # warm up outside the profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(passes):
                    forward(*inputs)
    finally:
        torch.set_num_threads(previous)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    kinds = dict.fromkeys([*OPERATOR_KINDS, "other"], 0.0)
    for e in events:
        kinds[kind_of(e.key)] += e.self_cpu_time_total / total
    return {"top": [{"op": e.key, "ms_per_pass": e.self_cpu_time_total / 1000 / passes,
                     "share": e.self_cpu_time_total / total, "calls_per_pass": e.count / passes}
                    for e in events[:top]],
            "by_kind": kinds, "ms_per_pass": total / 1000 / passes,
            "operators_per_pass": sum(e.count for e in events) / passes}


def main(argv=None) -> dict:
    args = parse_args(argv)
    teacher_dir, student_dir, prepared, task = run_paths(args.run)
    data = PreparedData(prepared)
    models = {"teacher": load_model(teacher_dir).eval(), "student": load_model(student_dir).eval()}
    forwards = {**{f"{name} before": TaskLogits(model, task) for name, model in models.items()},
                **{f"{name} after": TaskLogits(for_inference(model), task)
                   for name, model in models.items()}}
    single = fixed_batch(data, 1)
    flops = {name: count_flops(model, *single) for name, model in models.items()}
    ratio = flops["teacher"] / flops["student"]
    print(f"{args.run}: GFLOPs per example teacher {flops['teacher'] / 1e9:.4f}, student "
          f"{flops['student'] / 1e9:.4f}, ratio {ratio:.2f}")
    results = {"run": str(args.run), "flops": flops, "flops_ratio": ratio, "batches": {}}
    for bs in args.batch_sizes:
        inputs = fixed_batch(data, bs)
        timed = measure_latency({n: (lambda f=f, x=inputs: f(*x)) for n, f in forwards.items()},
                                repeats=args.repeats, warmup=args.warmup, threads=args.threads)
        ms = {name: r["median_ms"] for name, r in timed.items()}
        speed = {when: ms[f"teacher {when}"] / ms[f"student {when}"] for when in ("before", "after")}
        ops = {name: operator_profile(f, inputs, args.threads, args.top)
               for name, f in forwards.items()}
        results["batches"][f"batch_{bs}"] = {
            "latency_ms": ms, "speedup": speed,
            "speedup_over_flops_ratio": {when: v / ratio for when, v in speed.items()},
            "operators": ops}
        print(f"\nbatch {bs}:")
        for when in ("before", "after"):
            print(f"  {when}: teacher {ms['teacher ' + when]:.2f} ms, student "
                  f"{ms['student ' + when]:.2f} ms, speedup {speed[when]:.2f}x = "
                  f"{speed[when] / ratio:.2f} of the FLOPs ratio")
        for name, found in ops.items():
            kinds = ", ".join(f"{kind} {share:.0%}" for kind, share in found["by_kind"].items())
            print(f"  {name}: {found['ms_per_pass']:.2f} ms profiled, "
                  f"{found['operators_per_pass']:.0f} operators per pass; {kinds}")
            print(f"    top {args.top} operators by self CPU time:")
            for op in found["top"]:
                print(f"    {op['op']:<36}{op['ms_per_pass']:>9.3f} ms {op['share']:>7.1%}"
                      f"  {op['calls_per_pass']:>6.0f} calls")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
