"""Does the data pipeline hold at full size? Prepare and one training epoch on generated JPEGs.

Generates `--count` JPEG files of `--size` px (a shape on a noisy background) with X-VLM VQA
JSON annotations and pre-training pairs, in a temporary folder, then runs evlm's own stages as
DVC would, each in its own process:

  prepare_pairs, teacher_pretrain (a few steps: the tokenizer and a teacher to start from),
  prepare (every image: `storage: auto` picks files beyond 1 GiB decoded), and
  teacher: one epoch of a tiny model, once per `--workers` count.

It reports each process tree's peak RSS (main process, and with its data workers), wall time,
the loader's images/s alone with each worker count, and how well training is fed: the mean of
log.csv's `data_wait` (time waiting for the batch / step time). With `--memmap` it also measures
the alternative store: the same images decoded once into a memory-mapped uint8 file, read in
random batches.

    .venv/bin/python benchmarks/data_scale.py --out runs/bench/data_scale.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
          "yellow": (230, 210, 40), "purple": (140, 60, 170), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
# The tiny model of the epoch: cheap enough per example that the loader, not the model, is
# what a slow pipeline would show.
TINY = {"layers": 1, "width": 32, "heads": 2, "ffn": 64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20_000, help="JPEG files to generate")
    p.add_argument("--size", type=int, default=224, help="their side, and the prepared size")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--storage", default="auto", choices=("auto", "memory", "files"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-batches", type=int, default=60,
                   help="batches timed per worker count for the loader alone")
    p.add_argument("--memmap", action="store_true", help="also time a decoded memmap store")
    p.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    p.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    return p.parse_args(argv)


def make_dataset(root: Path, count: int, size: int, seed: int = 0) -> dict[str, Path]:
    """`count` JPEGs under root/images, one VQA question each (train 90%, test 10%), and one
    caption each as pre-training pairs; returns the annotation files."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    questions, pairs = [], []
    for i in range(count):
        color, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        side = SIDES[rng.integers(2)]
        image = Image.fromarray(rng.integers(150, 256, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        r = int(size * rng.uniform(0.12, 0.22))
        cx = int(size * (0.28 if side == "left" else 0.72))
        cy = int(size * rng.uniform(0.3, 0.7))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        name = f"images/{i:06d}.jpg"
        image.save(root / name, quality=90)
        questions.append({"image": name, "question": f"what color is the {shape}?",
                          "answer": [color], "question_id": i})
        pairs.append({"image": name, "caption": f"a {color} {shape} on the {side}"})
    cut = count - max(1, count // 10)
    files = {"train": root / "train.json", "test": root / "test.json", "pairs": root / "pairs.json",
             "answers": root / "answers.json"}
    files["answers"].write_text(json.dumps(names))
    files["train"].write_text(json.dumps(questions[:cut]))
    files["test"].write_text(json.dumps(questions[cut:]))
    files["pairs"].write_text(json.dumps(pairs))
    return files


def make_params(root: Path, files: dict[str, Path], size: int, batch_size: int,
                storage: str = "auto") -> dict:
    """The default spec with the generated data, a tiny model, one epoch for the teacher."""
    from evlm_cli.spec.load import load_spec

    spec = load_spec(ROOT / "specs" / "vqa_50pct.yaml")
    spec["pairs"].update(source="xvlm-json", train=[str(files["pairs"])], image_root=str(root),
                         image_size=size, limit=512, vocab_size=200)
    spec["data"].update(source="xvlm-json", train=[str(files["train"])],
                        test=[str(files["test"])], image_root=str(root), image_size=size,
                        answer_list=str(files["answers"]),
                        max_text_len=16, storage=storage)
    patch = size // 7 if size % 7 == 0 else 16
    for encoder in ("vision", "text", "fusion"):
        spec["teacher"][encoder].update(TINY)
    spec["teacher"]["vision"].update(patch_size=patch, stem="patch")
    spec["teacher"]["embed_dim"] = 16
    spec["pretrain"]["train"].update(max_steps=2, batch_size=16)
    spec["task_teacher"]["train"].update(epochs=1, batch_size=batch_size, max_steps=None,
                                         answer_balance=0, checkpoint_every=10**6)
    return spec


class PeakRss:
    """Polls a process for its resident memory, and its tree (data workers included) for their
    proportional share (PSS: forked workers share their parent's pages, which RSS would count
    once per process)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        import psutil

        self.process, self.every = psutil.Process(pid), every
        self.main = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                main = self.process.memory_full_info()
                tree = main.pss
                for child in self.process.children(recursive=True):
                    try:
                        tree += child.memory_full_info().pss
                    except psutil.Error:
                        pass  # a worker that just ended
            except psutil.Error:
                break
            self.main, self.tree = max(self.main, main.rss), max(self.tree, tree)
            time.sleep(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.main / 2**20, "peak_pss_with_workers_mb": self.tree / 2**20}


def run_stage(root: Path, kind: str, args: list[str]) -> dict:
    """One stage as its own process, as DVC runs it; its wall time and peak memory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "evlm_cli", "stage", kind, *args], cwd=root,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = PeakRss(child.pid)
    output, _ = child.communicate()
    report = {"wall_s": time.perf_counter() - start, **peak.stop()}
    if child.returncode != 0:
        raise SystemExit(f"stage {kind} failed ({child.returncode}):\n{output[-3000:]}")
    return report


def loader_rate(prepared: Path, workers: int, batch_size: int, batches: int) -> float:
    """Images per second through the training loader alone (no model), shuffled batches."""
    from evlm_cli.data.loader import PreparedData
    from evlm_cli.training.loop import EpochBatches

    split = PreparedData(prepared, workers=workers).split("train")
    epoch = EpochBatches(split, batch_size, seed=0)
    stream = epoch(0)
    next(stream)  # workers started, first batches in flight
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), stream, strict=False):
        seen += batch["images"].shape[0]
    rate = seen / (time.perf_counter() - start)
    stream.close()
    return rate


def memmap_rate(folder: Path, size: int, batch_size: int, batches: int) -> dict:
    """The alternative store: decode every image into a memory-mapped uint8 file, then read
    random batches from it. Its write time, size on disk and read rate."""
    from evlm_cli.data.images import decode_image

    paths = sorted((folder / "images").glob("*.jpg"))
    path = folder / "images.u8.npy"
    start = time.perf_counter()
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                      shape=(len(paths), 3, size, size))
    for row, image in enumerate(paths):
        store[row] = decode_image(image, size).numpy()
    store.flush()
    written = time.perf_counter() - start
    del store
    store = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        rows = np.sort(rng.choice(len(paths), batch_size, replace=False))
        np.ascontiguousarray(store[rows])
    rate = batches * batch_size / (time.perf_counter() - start)
    return {"write_s": written, "bytes": path.stat().st_size, "images_per_s": rate}


def mean_column(log: Path, column: str) -> float:
    with log.open() as f:
        values = [float(row[column]) for row in csv.DictReader(f)]
    return sum(values) / len(values)


def run(count: int, size: int, workers: list[int], batch_size: int, loader_batches: int,
        memmap: bool, folder: Path, storage: str = "auto") -> dict:
    t0 = time.perf_counter()
    files = make_dataset(folder, count, size)
    jpeg_bytes = sum(p.stat().st_size for p in (folder / "images").iterdir())
    report = {"count": count, "size": size, "generate_s": time.perf_counter() - t0,
              "jpeg_bytes": jpeg_bytes, "cpus": os.cpu_count()}
    spec = make_params(folder, files, size, batch_size, storage)
    for n in workers:
        spec["resources"]["data_workers"] = n
        (folder / f"params-w{n}.yaml").write_text(yaml.safe_dump(spec))
    params = ["--params", f"params-w{workers[0]}.yaml"]
    run_stage(folder, "prepare_pairs", [*params, "--data", "pairs"])
    run_stage(folder, "teacher_pretrain", [*params, "--pairs", "pairs", "--model", "pretrained",
                                           "--log", "pretrain.csv"])
    report["prepare"] = run_stage(folder, "prepare", [*params, "--pairs", "pairs",
                                                      "--data", "data"])
    meta = json.loads((folder / "data" / "meta.json").read_text())
    report["prepare"]["storage"] = meta["storage"]
    report["prepare"]["images_per_s"] = meta["num_images"] / report["prepare"]["wall_s"]
    report["loader_images_per_s"] = {n: loader_rate(folder / "data", n, batch_size,
                                                    loader_batches) for n in workers}
    report["epoch"] = {}
    for n in workers:
        log = folder / f"teacher-w{n}.csv"
        stats = run_stage(folder, "teacher", ["--params", f"params-w{n}.yaml",
                                              "--prepared", "data", "--pretrained", "pretrained",
                                              "--model", f"teacher-w{n}", "--log", str(log)])
        stats["data_wait"] = mean_column(log, "data_wait")
        stats["examples_per_s"] = mean_column(log, "examples_per_s")
        stats["steps"] = sum(1 for _ in log.open()) - 1
        report["epoch"][n] = stats
    if memmap:
        report["memmap"] = memmap_rate(folder, size, batch_size, loader_batches)
    return report


def print_report(r: dict) -> None:
    print(f"{r['count']} JPEGs of {r['size']} px ({r['jpeg_bytes'] / 2**20:.0f} MiB), "
          f"{r['cpus']} CPUs; generated in {r['generate_s']:.0f} s")
    p = r["prepare"]
    print(f"prepare ({p['storage']}): {p['wall_s']:.0f} s, {p['images_per_s']:.0f} images/s, "
          f"peak RSS {p['peak_rss_mb']:.0f} MiB")
    for n, rate in r["loader_images_per_s"].items():
        print(f"loader alone, {n} workers: {rate:.0f} images/s")
    for n, e in r["epoch"].items():
        print(f"epoch, {n} workers: {e['wall_s']:.0f} s for {e['steps']} steps, "
              f"{e['examples_per_s']:.0f} examples/s, data_wait {e['data_wait']:.2f}, "
              f"peak RSS {e['peak_rss_mb']:.0f} MiB (PSS with its workers "
              f"{e['peak_pss_with_workers_mb']:.0f} MiB)")
    if "memmap" in r:
        m = r["memmap"]
        print(f"memmap store: {m['bytes'] / 2**20:.0f} MiB on disk, written in "
              f"{m['write_s']:.0f} s, {m['images_per_s']:.0f} images/s in random batches")


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evlm-scale-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        report = run(args.count, args.size, args.workers, args.batch_size, args.loader_batches,
                     args.memmap, folder, args.storage)
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
