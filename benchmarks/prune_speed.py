"""Does pruning make the VLM faster? Measured CPU speedup of a sliced model next to its FLOPs ratio.

Two comparisons, each at every batch size asked for:
  1. the model vs itself with `--sparsity` of its heads and FFN neurons sliced out;
  2. a deeper teacher vs a depth-halved student (every other layer) with the same pruning,
     the comparison behind the product's headline speedup.
The target is speedup >= 0.8 x FLOPs ratio: slicing must turn removed FLOPs into time.

    .venv/bin/python benchmarks/prune_speed.py --out runs/bench/prune_speed.json

With `--swin DEPTHS...` the vision encoder is a Swin (`--vision` then gives its first stage's
width, heads and FFN width), and `--student-vision-map` picks the student's Swin layers per
stage. X-VLM-base (Swin-B 224, BERT-base 6 + 6) against a 2-2-6-2 / 3 / 3 student:

    .venv/bin/python benchmarks/prune_speed.py --swin 2 2 18 2 --window-size 7 \
        --vision 24 128 4 512 --text 6 768 12 3072 --fusion 6 768 12 3072 \
        --image-size 224 --patch-size 4 --teacher-layers 24 6 6 --student-layers 12 3 3 \
        --student-vision-map 0 1 2 3 6 9 12 15 18 21 22 23 --skip-dense
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from evlm_cli.compress.l0 import L0Gates
from evlm_cli.compress.measure import count_flops, count_params, measure_latency, speedup
from evlm_cli.compress.slice import slice_model
from evlm_cli.models.config import ENCODERS, make_config
from evlm_cli.models.student import student_from_teacher
from evlm_cli.models.vlm import VLM, prunable_param_count

UNITS = ("heads", "ffn")
TARGET_EFFICIENCY = 0.8  # speedup / FLOPs ratio the product promises


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = dict(nargs=4, type=int, metavar=("LAYERS", "WIDTH", "HEADS", "FFN"))
    p.add_argument("--vision", default=[6, 384, 6, 1536], **shape)
    p.add_argument("--text", default=[6, 384, 12, 1536], **shape)
    p.add_argument("--fusion", default=[6, 384, 12, 1536], **shape)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--num-answers", type=int, default=13)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of prunable params removed")
    p.add_argument("--spread", type=float, default=0.25,
                   help="per-layer keep fractions vary uniformly by +- this around the target")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--teacher-layers", type=int, nargs=3, default=[12, 6, 6],
                   metavar=("VISION", "TEXT", "FUSION"))
    p.add_argument("--student-layers", type=int, nargs=3, default=[6, 3, 3],
                   metavar=("VISION", "TEXT", "FUSION"))
    p.add_argument("--skip-student", action="store_true", help="only the first comparison")
    p.add_argument("--skip-dense", action="store_true", help="only the teacher-student comparison")
    p.add_argument("--swin", type=int, nargs="+", metavar="DEPTH",
                   help="a Swin vision encoder with these layers per stage")
    p.add_argument("--window-size", type=int, default=7, help="the Swin's window, in patches")
    p.add_argument("--student-vision-map", type=int, nargs="+", metavar="LAYER",
                   help="teacher vision layers of the student (a Swin's: in stage order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p.parse_args(argv)


def build_vlm(args: argparse.Namespace, layers: list[int] | None = None) -> VLM:
    """The benchmark shape; `layers` overrides the vision/text/fusion depths."""
    shapes = {}
    for i, enc in enumerate(ENCODERS):
        depth, width, heads, ffn = getattr(args, enc)
        shapes[enc] = dict(layers=layers[i] if layers else depth, width=width, heads=heads, ffn=ffn)
    if args.swin:  # the teacher's stages; a student takes its own from its layer map
        shapes["vision"].update(kind="swin", depths=args.swin, window_size=args.window_size,
                                layers=sum(args.swin))
    cfg = make_config(**shapes, image_size=args.image_size, patch_size=args.patch_size,
                      vocab_size=args.vocab_size, max_positions=max(args.text_len, 16),
                      heads=["vqa"], num_answers=args.num_answers)
    return VLM(cfg).eval()


def _kept_counts(keep: Tensor, sizes: Tensor, costs: Tensor, shift: float) -> tuple[Tensor, float]:
    counts = ((keep + shift).clamp(0.05, 1.0) * sizes).round()
    return counts, 1.0 - float((counts * costs).sum() / (sizes * costs).sum())


def uneven_gates(model: VLM, sparsity: float, spread: float, seed: int) -> dict[str, Tensor]:
    """Deterministic gates like a trained L0 run leaves: uneven per layer, global sparsity on target.

    Each group's keep fraction is drawn around 1 - sparsity; one shared shift, found by
    bisection, brings the exact parameter sparsity of the rounded counts to the target. Kept
    units are a random subset with soft values in (0.5, 1], as the test-time estimator gives.
    """
    g = torch.Generator().manual_seed(seed)
    groups = model.prunable_groups(UNITS)
    sizes = torch.tensor([grp.size for grp in groups], dtype=torch.float64)
    costs = torch.tensor([grp.unit_params for grp in groups], dtype=torch.float64)
    keep = (1.0 - sparsity) + spread * (2 * torch.rand(len(groups), generator=g, dtype=torch.float64) - 1)
    low, high = -1.0, 1.0  # sparsity falls as the shift rises
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _kept_counts(keep, sizes, costs, mid)[1] > sparsity else (low, mid)
    counts, _ = _kept_counts(keep, sizes, costs, (low + high) / 2)
    gates = {}
    for grp, count in zip(groups, counts.long().tolist(), strict=True):
        values = torch.zeros(grp.size)
        kept = torch.randperm(grp.size, generator=g)[:count]
        values[kept] = 0.5 + 0.5 * torch.rand(count, generator=g)
        gates[grp.name] = values
    return gates


def sparsity_report(model: VLM, sliced: VLM, gates: dict[str, Tensor]) -> dict:
    """Sparsity reached, by L0Gates' exact mask accounting and by the sliced model's config."""
    accounting = L0Gates(model.prunable_groups(UNITS))
    masks = {name: values > 0 for name, values in gates.items()}
    report = {}
    for enc in [None, *ENCODERS]:
        total, kept = accounting.total_params(enc), accounting.kept_params_from_masks(masks, enc)
        report[enc or "overall"] = 1.0 - kept / total
    before, after = prunable_param_count(model.config), prunable_param_count(sliced.config)
    report["overall_from_sliced_config"] = 1.0 - after["total"] / before["total"]
    return report


def make_inputs(model: VLM, batch: int, text_len: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size,
                         generator=g)
    input_ids = torch.randint(1, cfg.text.vocab_size, (batch, text_len), generator=g)
    return images, input_ids, torch.ones(batch, text_len, dtype=torch.long)


def vqa_logits(model: VLM, inputs, gates: dict[str, Tensor] | None = None) -> Tensor:
    """The timed unit: one full inference, encoders and head."""
    return model.logits("vqa", model(*inputs, gates=gates))


@torch.no_grad()
def max_abs_diff(model: VLM, gates: dict[str, Tensor], sliced: VLM, inputs) -> float:
    return (vqa_logits(model, inputs, gates) - vqa_logits(sliced, inputs)).abs().max().item()


def flops(model: VLM, inputs) -> tuple[int, int]:
    """count_flops as evaluate reports it, and with attention's matmuls counted too.

    On CPU, torch's fused SDPA kernel has no FLOP formula, so count_flops leaves the attention
    scores and context out; the math backend spells them as matmuls that are counted.
    """
    plain = count_flops(vqa_logits, model, inputs)
    with sdpa_kernel([SDPBackend.MATH]):
        with_attention = count_flops(vqa_logits, model, inputs)
    return plain, with_attention


def compare(dense: VLM, pruned: VLM, args: argparse.Namespace) -> list[dict]:
    """One row per batch size: latencies measured interleaved, FLOPs, and their ratios."""
    rows = []
    for batch in args.batch_sizes:
        inputs = make_inputs(dense, batch, args.text_len, args.seed + batch)
        dense_flops, dense_flops_attn = flops(dense, inputs)
        pruned_flops, pruned_flops_attn = flops(pruned, inputs)
        timed = measure_latency({"dense": lambda d=dense, x=inputs: vqa_logits(d, x),
                                 "pruned": lambda p=pruned, x=inputs: vqa_logits(p, x)},
                                repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                seed=args.seed)
        ratio = dense_flops / pruned_flops
        ratio_attn = dense_flops_attn / pruned_flops_attn
        gain = speedup(timed["dense"], timed["pruned"])
        rows.append({"batch": batch, "dense_ms": timed["dense"]["median_ms"],
                     "pruned_ms": timed["pruned"]["median_ms"],
                     "dense_p90_ms": timed["dense"]["p90_ms"], "pruned_p90_ms": timed["pruned"]["p90_ms"],
                     "speedup": gain, "dense_flops": dense_flops, "pruned_flops": pruned_flops,
                     "flops_ratio": ratio, "speedup_over_flops_ratio": gain / ratio,
                     "flops_ratio_with_attention": ratio_attn,
                     "speedup_over_flops_ratio_with_attention": gain / ratio_attn,
                     "meets_target": gain >= TARGET_EFFICIENCY * ratio})
    return rows


def prune_and_check(model: VLM, args: argparse.Namespace) -> tuple[VLM, dict]:
    """Slice `model` at the target sparsity; report sparsity reached and the slicing error."""
    gates = uneven_gates(model, args.sparsity, args.spread, args.seed)
    sliced = slice_model(model, gates).eval()
    check = make_inputs(model, 4, args.text_len, args.seed)
    info = {"sparsity": sparsity_report(model, sliced, gates),
            "max_abs_diff_vs_gated": max_abs_diff(model, gates, sliced, check),
            "kept_heads": {e: sliced.config.encoder(e).heads for e in ENCODERS},
            "kept_ffn": {e: sliced.config.encoder(e).ffn for e in ENCODERS}}
    return sliced, info


def print_table(title: str, rows: list[dict], params_before: int, params_after: int,
                info: dict) -> None:
    s = info["sparsity"]
    print(f"\n## {title}")
    print(f"params {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}); "
          f"prunable sparsity {s['overall']:.4f} (sliced config: {s['overall_from_sliced_config']:.4f}; "
          + ", ".join(f"{e} {s[e]:.3f}" for e in ENCODERS)
          + f"); max |sliced - gated| = {info['max_abs_diff_vs_gated']:.2e}")
    header = ("batch", "dense ms", "pruned ms", "speedup", "FLOPs ratio", "speedup/FLOPs",
              "FLOPs ratio+attn", "speedup/FLOPs+attn")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['batch']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | {r['speedup']:.2f} | "
              f"{r['flops_ratio']:.2f} | {r['speedup_over_flops_ratio']:.2f} | "
              f"{r['flops_ratio_with_attention']:.2f} | "
              f"{r['speedup_over_flops_ratio_with_attention']:.2f} |")


def run_comparison(title: str, dense: VLM, pruned: VLM, info: dict, args) -> dict:
    rows = compare(dense, pruned, args)
    before, after = count_params(dense), count_params(pruned)
    print_table(title, rows, before, after, info)
    return {"title": title, "params_before": before, "params_after": after, **info, "rows": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "torch": torch.__version__, "target": f"speedup >= {TARGET_EFFICIENCY} x FLOPs ratio"}
    if not args.skip_dense:
        model = build_vlm(args)
        sliced, info = prune_and_check(model, args)
        results["pruned_vs_dense"] = run_comparison(
            f"dense vs {args.sparsity:.0%}-pruned (same depth)", model, sliced, info, args)
        del model, sliced
    if not args.skip_student:
        teacher = build_vlm(args, args.teacher_layers)
        student, _ = student_from_teacher(teacher, dict(zip(ENCODERS, args.student_layers, strict=True)),
                                          {"vision": args.student_vision_map})
        pruned_student, info = prune_and_check(student.eval(), args)
        depths = lambda m: "/".join(str(m.config.encoder(e).layers) for e in ENCODERS)  # noqa: E731
        results["teacher_vs_student"] = run_comparison(
            f"teacher {depths(teacher)} vs {args.sparsity:.0%}-pruned half-depth student "
            f"{depths(student)}", teacher, pruned_student, info, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
