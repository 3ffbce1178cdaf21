"""The small version of `benchmarks/data_scale.py`: generated JPEGs in X-VLM's VQA format,
prepared as files (no decoded copy), then one epoch of a tiny teacher fed by two data
workers. The full size (20,000 JPEGs of 224 px) runs as the benchmark."""

import csv
import importlib.util
import json
import resource
from pathlib import Path

import yaml

from evlm_cli.pipeline.entry import run_stage
from evlm_cli.training.loop import fit
from tests.helpers.training import FixedBatches, linear_run

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "data_scale.py"
COUNT, SIZE, BATCH = 240, 64, 16


def load_benchmark():
    spec = importlib.util.spec_from_file_location("data_scale", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_and_an_epoch_from_jpeg_files(tmp_path, monkeypatch):
    bench = load_benchmark()
    files = bench.make_dataset(tmp_path, COUNT, SIZE)
    assert len(list((tmp_path / "images").glob("*.jpg"))) == COUNT
    spec = bench.make_params(tmp_path, files, SIZE, BATCH, storage="files")
    spec["resources"]["data_workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    p = ["--params", "params.yaml"]
    assert run_stage("prepare_pairs", [*p, "--data", "pairs"]) == 0
    assert run_stage("teacher_pretrain", [*p, "--pairs", "pairs", "--model", "pretrained",
                                          "--log", "pretrain.csv"]) == 0
    assert run_stage("prepare", [*p, "--pairs", "pairs", "--data", "data"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["storage"] == "files" and not (tmp_path / "data" / "images.safetensors").exists()
    assert meta["num_images"] == COUNT
    assert run_stage("teacher", [*p, "--prepared", "data", "--pretrained", "pretrained",
                                 "--model", "teacher", "--log", "teacher.csv"]) == 0
    with (tmp_path / "teacher.csv").open() as f:
        rows = list(csv.DictReader(f))
    train = meta["splits"]["train"]["examples"]
    assert len(rows) == train // BATCH  # one epoch of full batches
    assert all(float(r["examples_per_s"]) > 0 for r in rows)  # the throughput is logged
    # this process held pytest, torch and the stages: still far from the 2 GB bound
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 * 2**20  # KiB


def test_data_wait_is_the_share_of_each_step_spent_waiting_for_its_batch(tmp_path):
    """log.csv's data_wait: high when the loader is the bottleneck, low when the model is.
    Each batch takes DELAY to arrive, or each step DELAY to compute: the other part of the
    step takes a few milliseconds (a linear model), so the share is near 1 and near 0."""
    delay, steps = 0.05, 4
    fit(linear_run(tmp_path / "slow", steps=steps, batches=FixedBatches(steps, delay=delay)))
    fit(linear_run(tmp_path / "fast", steps=steps, step_time=delay))
    for run, low, high in (("slow", 0.6, 1.0), ("fast", 0.0, 0.4)):
        with (tmp_path / run / "log.csv").open() as f:
            waits = [float(r["data_wait"]) for r in csv.DictReader(f)]
        assert len(waits) == steps and all(low <= w <= high for w in waits), (run, waits)
