"""The task teacher of a finished run in PyTorch and in ONNX Runtime under several session
settings, timed side by side: which runtime is faster, and what ONNX Runtime's settings change.

    python benchmarks/onnx_teacher.py PROJECT [--variants NAME,NAME...] [--threads 2]

PROJECT is a folder where a VQA spec has run (its shared task teacher and prepared data are
used). Variants (name prefixes): `pytorch` (the inference copy evaluate times, and the model
as saved), `ort` (evlm's session: no spinning, every graph optimisation), `ort-spin`
(ONNX Runtime's default spinning), `ort-extended`, `ort-basic` (fewer graph optimisations).
Time spinning sessions apart from the rest: their idle threads spin after each call and take
the cores from whatever runs next.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from evlm_cli.compress.measure import measure_latency
from evlm_cli.data.loader import PreparedData
from evlm_cli.deploy.onnx import FP32_FILE, export_onnx
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import TaskLogits, for_inference
from evlm_cli.recipe.scoring import fixed_batch

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


class Session:
    """An ONNX file in a CPU session with the given spinning and optimisation level."""

    def __init__(self, path: Path, threads: int, spinning: bool, level: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        options.graph_optimization_level = LEVELS[level]
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, images, input_ids, attention_mask):
        return self.session.run(None, {"images": images.float().numpy(),
                                       "input_ids": input_ids.long().numpy(),
                                       "attention_mask": attention_mask.long().numpy()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--variants", default="pytorch,ort,ort-extended,ort-basic")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    teacher_dir = next(args.project.glob("runs/shared/teacher-*/model"))
    data = PreparedData(next(args.project.glob("runs/shared/prepare-*/data")))
    teacher = load_model(teacher_dir).eval()
    path = export_onnx(teacher, "vqa", fixed_batch(data, 2),
                       Path(tempfile.mkdtemp()) / FP32_FILE, 17)
    every = {
        "pytorch (inference copy)": lambda: TaskLogits(for_inference(teacher), "vqa"),
        "pytorch (as saved)": lambda: TaskLogits(teacher, "vqa"),
        "ort (evlm: no spinning, all)": lambda: Session(path, args.threads, False, "all"),
        "ort-spin (spinning, all)": lambda: Session(path, args.threads, True, "all"),
        "ort-extended (no spinning)": lambda: Session(path, args.threads, False, "extended"),
        "ort-basic (no spinning)": lambda: Session(path, args.threads, False, "basic"),
    }
    wanted = args.variants.split(",")
    chosen = {name: make() for name, make in every.items()
              if any(name.split(" ")[0] == w for w in wanted)}
    for batch_size in (1, 32):
        inputs = fixed_batch(data, batch_size)
        calls = {name: (lambda f=f, x=inputs: f(*x)) for name, f in chosen.items()}
        timed = measure_latency(calls, repeats=30, warmup=5, threads=args.threads)
        print(f"batch {batch_size}")
        for name, r in timed.items():
            print(f"  {name:<32}{r['median_ms']:8.2f} ms  (p90 {r['p90_ms']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
