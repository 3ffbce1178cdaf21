"""`evlm run --remote NAME`: stages shared through a DVC remote, so that machines which share it
never recompute a stage one of them has finished.

DVC's run cache is the mechanism: an entry per finished stage, keyed by its command, its
dependencies' hashes and its params, naming the outputs' hashes. A stage whose key has an entry
is restored, not run. Two gaps keep `dvc repro --pull` and `dvc push --run-cache` from sharing
evlm's stages as they stand:
- `dvc push --run-cache` sends the entries and the objects of cached outputs, but not the
  objects of `cache: false` outputs (evlm's metrics.json, log.csv, masks.json), which the entry
  names all the same. A machine that pulls such an entry cannot restore the stage from it, so it
  runs the stage again. evlm pushes those objects itself (`publish`), before the entries, so
  an entry never reaches the remote ahead of its files.
- `dvc repro --pull` pulls the entries once, before the first stage, so a stage that another
  machine finishes while this one works would still be run here. evlm reproduces one stage at
  a time, pulling the entries before each and publishing after each.
- Two machines started together would both run the stages they share. So a machine claims a
  stage on the remote before it runs it (`Claims`): a small file under `evlm/claims/`, named
  by the stage's run-cache key and rewritten every `BEAT_S` seconds while the stage runs. A
  machine that finds another's claim waits for that stage's entry, and takes the claim over
  if the file stops changing for `STALE_S` seconds (its holder was killed).

This module runs as the child process `evlm run` streams and logs (the place of `dvc repro`):
`python -m evlm_cli.pipeline.remote --remote NAME [--force] TARGET...`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from evlm_cli.core.errors import EvlmError


def remote_names(root: Path = Path(".")) -> list[str]:
    """The remotes of the DVC project at `root` (its config files, local ones included)."""
    from dvc.config import Config

    return sorted(Config(str(root / ".dvc"), validate=False)["remote"])


def check_remote(name: str, root: Path = Path(".")) -> None:
    """Refuse a remote the project does not define, naming the ones it does."""
    if not (root / ".dvc").is_dir():
        raise EvlmError(f"--remote {name}: {root.resolve()} is not a DVC project yet; run "
                        f"`dvc init` and `dvc remote add {name} URL` there first")
    known = remote_names(root)
    if name not in known:
        have = f"its remotes: {', '.join(known)}" if known else "it has none"
        raise EvlmError(f"--remote {name}: no such DVC remote in {root.resolve()} ({have}); "
                        f"add it with `dvc remote add {name} URL`")


# A holder rewrites its claim this often; a claim unchanged for STALE_S is taken over.
BEAT_S, STALE_S, POLL_S = 10.0, 60.0, 3.0
# After writing a claim, how long to wait before reading it back to see who won.
SETTLE_S = 1.0


class Claims:
    """Claims on stages, kept as files in a folder of a filesystem every machine can reach (the
    DVC remote's, through DVC's filesystem layer: a local folder, SSH, S3, ...).

    A claim file holds its holder's token, host and pid, and a beat count its holder raises
    every `beat_s` seconds. Who holds a stage is decided by reading back after writing: two
    machines that write at once both read the later write, so one of them waits. A waiter
    judges staleness by its own clock, as the time since the file last changed, so machines
    need not agree on the time.
    """

    def __init__(self, fs, folder: str, beat_s: float = BEAT_S, stale_s: float = STALE_S,
                 poll_s: float = POLL_S, settle_s: float = SETTLE_S):
        self.fs, self.folder = fs, folder
        self.beat_s, self.stale_s, self.poll_s, self.settle_s = beat_s, stale_s, poll_s, settle_s
        self.token = f"{socket.gethostname()} (pid {os.getpid()}, claim {uuid.uuid4().hex[:8]})"

    def _path(self, key: str) -> str:
        return self.fs.join(self.folder, key)

    def read(self, key: str) -> str | None:
        try:
            return self.fs.read_text(self._path(key))
        except FileNotFoundError:
            return None

    def _write(self, key: str, beat: int) -> None:
        """Write the claim whole, by renaming a finished file over it: a reader that met a
        half-written file would take the claim for free."""
        self.fs.makedirs(self.folder, exist_ok=True)
        part = self.fs.join(self.folder, f".{key}.{uuid.uuid4().hex[:8]}")
        self.fs.write_text(part, f"{self.token} beat {beat}")
        self.fs.mv(part, self._path(key))

    def holder(self, content: str | None) -> str | None:
        """Who a claim's content names, or None when it names no one or this process."""
        if not content or content.startswith(self.token + " "):
            return None
        return content.rsplit(" beat ", 1)[0]

    def release(self, key: str) -> None:
        if self.holder(self.read(key)) is None:  # ours (or gone): never remove another's
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(key))

    @contextlib.contextmanager
    def hold(self, key: str, done: Callable[[], bool],
             say: Callable[[str], None] = print) -> Iterator[bool]:
        """Claim `key` and keep the claim fresh while the body runs, then release it; yields
        True. Yields False without claiming once `done()` says another machine finished the
        stage while this one waited for it."""
        last, since, told = None, time.monotonic(), False
        while True:
            content = self.read(key)
            if content != last:
                last, since = content, time.monotonic()
            other = self.holder(content)
            stale = other is not None and time.monotonic() - since >= self.stale_s
            if other is None or stale:
                if stale:
                    say(f"the claim of {other} has not changed for {self.stale_s:.0f} s; "
                        "taking it over")
                self._write(key, 0)
                time.sleep(self.settle_s)
                if self.holder(self.read(key)) is None:
                    break
                continue  # another machine wrote after us: it holds the stage
            if not told:
                say(f"{other} is running it; waiting for its result")
                told = True
            time.sleep(self.poll_s)
            if done():
                yield False
                return
        stop = threading.Event()

        def beat() -> None:
            count = 0
            while not stop.wait(self.beat_s):
                count += 1
                with contextlib.suppress(OSError):
                    self._write(key, count)

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            yield True
        finally:
            stop.set()
            beating.join()
            self.release(key)


def _remote_odb(repo):
    return repo.cloud.get_remote_odb(None, "push --run-cache", hash_name="md5-dos2unix")


def _entries_missing_there(repo, odb) -> list[tuple[str, str]]:
    """The run-cache entries this machine has and the remote (`odb`) lacks, as (key, value)
    pairs."""
    runs = odb.fs.join(odb.path, "runs")
    there = set()
    if odb.fs.exists(runs):
        for path in odb.fs.find(runs):
            parent = odb.fs.parent(path)
            there.add((odb.fs.name(parent), odb.fs.name(path)))
    local = Path(repo.stage_cache.cache_dir)
    here = {(entry.parent.name, entry.name) for entry in local.glob("*/*/*") if entry.is_file()}
    return sorted(here - there)


def publish(repo, odb) -> int:
    """Push to the default remote (`odb`, `_remote_odb`) every run-cache entry it lacks: first
    the objects of each entry's outputs, the uncached ones included, then the entries. The
    number pushed."""
    missing = _entries_missing_there(repo, odb)
    if not missing:
        return 0
    for destination, objects in repo.stage_cache.get_used_objs(missing).items():
        result = repo.cloud.push(objects, odb=destination)
        if result.failed:
            names = ", ".join(sorted(str(o.obj_name or o.value) for o in result.failed))
            raise EvlmError(f"remote {repo.config['core']['remote']}: could not push {names}")
    repo.stage_cache.push(None)
    return len(missing)


def reproduce(targets: list[str], remote: str, force: bool = False) -> None:
    """Reproduce `targets` and what they depend on, one stage at a time, restoring any stage a
    machine sharing `remote` has finished and publishing each stage's entry once it is done."""
    from dvc.repo import Repo  # importing dvc sets up its logging, as its command line's
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(".", remote=remote) as repo:
        # DVC's reminder to `git add` would follow every stage, not once at the end as under
        # `dvc repro`; `core.autostage` still stages the files
        repo.scm_context.quiet = True
        odb = _remote_odb(repo)
        pushed = publish(repo, odb)  # what this machine finished before, e.g. without --remote
        if pushed:
            print(f"evlm: pushed {pushed} finished stage(s) to remote '{remote}'", flush=True)
        claims = Claims(odb.fs, odb.fs.join(odb.path, "evlm", "claims"))
        steps = plan_repro(get_active_graph(repo.index.graph), collect_stages(repo, targets))
        for name in [stage.addressing for stage in steps]:
            with _claimed(repo, odb, name, claims, force):
                # pull=True pulls the remote's run-cache entries first, and the objects of the
                # entry that matches, if one does: DVC then restores the stage, not runs it
                repo.reproduce(name, single_item=True, pull=True, force=force)
                pushed = publish(repo, odb)
            if pushed:
                print(f"evlm: stage '{name}' pushed to remote '{remote}'", flush=True)


def _needs_run(repo, name: str) -> str | None:
    """The run-cache key of stage `name` as its dependencies stand now, when this machine would
    run it; None when it is up to date here or DVC would not cache it (its inputs are missing,
    say, which the run will report)."""
    from dvc.exceptions import DvcException
    from dvc.repo import lock_repo
    from dvc.stage.cache import _can_hash, _get_stage_hash

    with lock_repo(repo):
        stage = repo.stage.collect(name)[0]
        try:
            if not stage.changed():
                return None
            stage.save_deps()
            return _get_stage_hash(stage) if _can_hash(stage) else None
        except (DvcException, OSError):
            return None


def _finished(repo, odb, key: str) -> bool:
    """Whether a run of the stage keyed `key` is in the run cache here or on the remote."""
    folder = Path(repo.stage_cache.cache_dir) / key[:2] / key
    if folder.is_dir() and any(folder.iterdir()):
        return True
    there = odb.fs.join(odb.path, "runs", key[:2], key)
    return odb.fs.exists(there) and bool(odb.fs.find(there))


@contextlib.contextmanager
def _claimed(repo, odb, name: str, claims: Claims, force: bool) -> Iterator[None]:
    """Hold the claim on stage `name` while the body runs it, unless no one needs to run it:
    it is up to date here, or a finished run of it is on the remote (the body restores it).
    With --force every stage runs here, so there is nothing to wait for."""
    key = None if force else _needs_run(repo, name)
    if key is None or _finished(repo, odb, key):
        yield
        return

    def say(text: str) -> None:
        print(f"evlm: stage '{name}': {text}", flush=True)

    with claims.hold(key, done=lambda: _finished(repo, odb, key), say=say):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evlm_cli.pipeline.remote")
    parser.add_argument("--remote", required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args(argv)
    from dvc.exceptions import DvcException

    try:
        reproduce(args.targets, args.remote, args.force)
    except (DvcException, EvlmError) as error:
        # the runner finds the failed stage in "failed to reproduce 'NAME'", as in dvc repro's
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        cause = error.__cause__
        if cause is not None:
            print(f"ERROR: {cause}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
