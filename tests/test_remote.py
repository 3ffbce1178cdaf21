"""`evlm run --remote NAME`: stages shared through a DVC remote (evlm_cli.pipeline.remote).

The claims are tested on a local folder in one process; the sharing itself on small DVC
projects whose one stage is a Python one-liner, so no model is trained here (the tiny pipeline
shares its stages this way in tests/test_pipeline.py)."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evlm_cli.cli.main import main
from evlm_cli.core.errors import EvlmError
from evlm_cli.pipeline.remote import Claims, check_remote
from tests.helpers.pipeline import sh
from tests.helpers.project import TINY

FAST = {"beat_s": 0.05, "stale_s": 10.0, "poll_s": 0.02, "settle_s": 0.05}


def local_claims(folder: Path, **timing) -> Claims:
    from dvc.fs import LocalFileSystem

    return Claims(LocalFileSystem(), str(folder), **{**FAST, **timing})


def test_a_waiter_waits_for_the_holder_and_runs_nothing_once_it_is_done(tmp_path):
    holder, waiter = local_claims(tmp_path), local_claims(tmp_path)
    said, finished = [], threading.Event()
    with holder.hold("key", done=lambda: False) as held:
        assert held is True and holder.read("key").startswith(holder.token)
        thread = threading.Thread(target=lambda: _wait(waiter, finished, said))
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # waiting: the claim is fresh and the stage is not done
        finished.set()  # the holder's result reaches the remote
        thread.join(5)
    assert not thread.is_alive()
    assert said == [f"{holder.token} is running it; waiting for its result"]
    assert waiter.result is False  # it did not claim: it restores the holder's result
    assert holder.read("key") is None  # released


def _wait(claims, finished, said):
    with claims.hold("key", done=finished.is_set, say=said.append) as held:
        claims.result = held


def test_a_claim_that_stops_changing_is_taken_over_and_a_fresh_one_is_not(tmp_path):
    dead = local_claims(tmp_path)
    dead._write("key", 3)  # a holder that was killed: its beats stopped
    said = []
    taker = local_claims(tmp_path, stale_s=0.3)
    started = time.monotonic()
    with taker.hold("key", done=lambda: False, say=said.append) as held:
        assert held is True
        assert time.monotonic() - started >= 0.3
        assert taker.read("key").startswith(taker.token)
    assert any("has not changed for 0 s; taking it over" in line for line in said)
    # the holder's beats keep its claim fresh past stale_s: the waiter never takes it over
    holder, waiter = local_claims(tmp_path, beat_s=0.05), local_claims(tmp_path, stale_s=0.3)
    done = threading.Event()
    with holder.hold("key", done=lambda: False):
        thread = threading.Thread(target=lambda: _wait(waiter, done, []))
        thread.start()
        time.sleep(1.0)
        assert holder.read("key").startswith(holder.token)
        done.set()
        thread.join(5)
    assert waiter.result is False


def test_release_leaves_another_holders_claim(tmp_path):
    mine, other = local_claims(tmp_path), local_claims(tmp_path)
    other._write("key", 0)
    mine.release("key")
    assert other.read("key").startswith(other.token)


def test_two_claimants_at_once_hold_the_stage_one_after_the_other(tmp_path):
    spans = []

    def claimant():
        claims = local_claims(tmp_path)
        with claims.hold("key", done=lambda: False) as held:
            assert held
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=claimant) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(spans) == 3
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_an_unknown_remote_is_refused_naming_the_known_ones(in_tmp_dir):
    with pytest.raises(EvlmError, match=r"--remote shared: .* is not a DVC project yet; run "
                                        r"`dvc init` and `dvc remote add shared URL`"):
        check_remote("shared")
    sh([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], in_tmp_dir)
    sh([sys.executable, "-m", "dvc", "remote", "add", "store", str(in_tmp_dir / "r")], in_tmp_dir)
    with pytest.raises(EvlmError, match=r"no such DVC remote in .* \(its remotes: store\)"):
        check_remote("shared")
    check_remote("store")
    # evlm run says so in one line, exit status 2, before it writes anything
    result = CliRunner().invoke(main, ["run", "--remote", "shared", str(TINY)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "its remotes: store" in result.stderr
    assert not (in_tmp_dir / "dvc.yaml").exists() and not (in_tmp_dir / "runs").exists()


# A stage that counts its runs in a file outside both projects, writes a cached output and an
# uncached metric (as evlm's metrics.json and log.csv are), and takes `seconds` to do it.
STAGE = ("import pathlib, sys, time; time.sleep({seconds}); "
         "open(sys.argv[1], 'a').write('ran\\n'); pathlib.Path('out').mkdir(exist_ok=True); "
         "pathlib.Path('out/x').write_text(open('in.txt').read()); "
         "pathlib.Path('m.json').write_text('{{\"m\": 1}}')")


def dvc_project(folder: Path, remote: Path, counter: Path, seconds: float = 0) -> Path:
    folder.mkdir()
    sh([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], folder)
    sh([sys.executable, "-m", "dvc", "remote", "add", "shared", str(remote)], folder)
    (folder / "in.txt").write_text("the input\n")
    (folder / "stage.py").write_text(STAGE.format(seconds=seconds))
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"one": {
        "cmd": f"{sys.executable} stage.py {counter}", "deps": ["in.txt", "stage.py"],
        "outs": ["out"], "metrics": [{"m.json": {"cache": False}}]}}}))
    return folder


def share(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evlm_cli.pipeline.remote", "--remote",
                             "shared", "one"], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_stage_finished_on_one_machine_is_restored_on_another_uncached_outputs_too(tmp_path):
    counter = tmp_path / "runs.txt"
    first = dvc_project(tmp_path / "a", tmp_path / "remote", counter)
    second = dvc_project(tmp_path / "b", tmp_path / "remote", counter)
    out, _ = share(first).communicate(timeout=120)
    assert "Running stage 'one'" in out and "evlm: stage 'one' pushed to remote 'shared'" in out
    out, _ = share(second).communicate(timeout=120)
    assert "Stage 'one' is cached - skipping run, checking out outputs" in out, out
    assert counter.read_text() == "ran\n"
    # the uncached metric came too: `dvc push --run-cache` alone leaves its object behind
    assert (second / "m.json").read_text() == '{"m": 1}'
    assert (second / "out/x").read_text() == "the input\n"
    # a changed input is a new stage: it runs
    (second / "in.txt").write_text("another input\n")
    out, _ = share(second).communicate(timeout=120)
    assert "Running stage 'one'" in out and counter.read_text() == "ran\nran\n"


def test_two_machines_started_together_run_a_shared_stage_once(tmp_path):
    counter = tmp_path / "runs.txt"
    projects = [dvc_project(tmp_path / name, tmp_path / "remote", counter, seconds=3)
                for name in ("a", "b")]
    procs = [share(project) for project in projects]
    outs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert counter.read_text() == "ran\n", outs
    ran = [out for out in outs if "Running stage 'one'" in out]
    waited = [out for out in outs if "is running it; waiting for its result" in out]
    assert len(ran) == 1 and len(waited) == 1 and ran != waited
    assert "Stage 'one' is cached - skipping run" in waited[0]
    for project in projects:
        assert (project / "m.json").read_text() == '{"m": 1}'
    assert not list((tmp_path / "remote/evlm/claims").iterdir())  # released
