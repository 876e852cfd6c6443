"""What keeps a run directory sound: one process at a time, a metrics log that survives a torn
write, and a record of what produced each artefact.

    run_dir/
      .lock             names the process that holds the run directory's lock
      artefacts.json    for each artefact, what made it (data, tokenizer settings, source file)
                        and the sha256 of the files the run loads again (the tokenizer's)
      metrics.jsonl     one JSON object per line, appended

The lock is an advisory `flock` on the run directory itself, so deleting `.lock` does not free
it; the kernel releases it when its process exits, however it exits, so a crashed run never
leaves a lock that blocks the next one.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import pathlib
import socket
import time
from typing import Any

from transformer import runs
from transformer.files import sha256_file, write_atomically


class RunDirectoryBusy(RuntimeError):
    """Raised when another process holds a run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory while a run trains.

    `acquire` creates the directory (and its missing parents); `release` removes what it created
    when nothing but the lock file was written there, so a start refused before it wrote
    anything (a mesh the devices cannot form, a vocabulary too large) leaves no directory behind.
    """

    def __init__(self, run_dir: pathlib.Path):
        self.run_dir = run_dir
        self.path = run_dir / ".lock"  # who holds the lock, for the message of the next process
        self._descriptor: int | None = None
        self._created: list[pathlib.Path] = []  # the directories acquire made, deepest first

    def acquire(self) -> str:
        """Takes the lock; returns who held it last ("" for a new directory or a clean exit).

        Raises RunDirectoryBusy naming the holder when a live process has it.
        """
        created = list(itertools.takewhile(lambda path: not path.exists(), (self.run_dir, *self.run_dir.parents)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RunDirectoryBusy(
                f"{self.run_dir} is in use by {self._holder() or 'another process'}. Wait for that run to finish (or "
                "stop it with SIGTERM: it saves and exits), or choose another run_dir."
            ) from None
        try:
            previous = self._holder()
            self.path.write_text(
                f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n",
                encoding="utf-8",
            )
        except BaseException:  # not held after all: a later acquire in this process must not find it taken
            os.close(descriptor)
            raise
        self._descriptor, self._created = descriptor, created
        return previous

    def release(self) -> None:
        """Frees the lock and empties the file (a non-empty file afterwards means a crashed holder),
        or removes the directories `acquire` created when they hold nothing else."""
        if self._descriptor is None:
            return
        try:
            if self._created and os.listdir(self.run_dir) == [self.path.name]:
                self.path.unlink()
                for directory in self._created:  # while still locked: no other start is in it
                    directory.rmdir()
            else:
                self.path.write_text("", encoding="utf-8")
        except OSError:  # a parent in use; a full or read-only disk (the next start takes the lock over as stale)
            pass
        finally:
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None

    def _holder(self) -> str:
        """Who the lock file names ("" when nobody, or the file is gone)."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- metrics log


def read_metrics(path: pathlib.Path) -> tuple[list[dict], list[int]]:
    """The records of a metrics.jsonl and the numbers of lines that are not JSON records
    (a line torn by a full disk or a kill mid-write)."""
    if not path.exists():
        return [], []
    records, damaged = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            damaged.append(number)
    return records, damaged


def append_line(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Appends one JSON record as a single write, so a crash can tear only the last line."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def rewrite(path: pathlib.Path, records: list[dict]) -> None:
    """Replaces the file with `records`, atomically."""
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------- artefacts


def sha256_json(value: Any) -> str:
    """A digest of a JSON-serialisable value (e.g. the training examples)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class Artefacts:
    """artefacts.json: for each file of the run directory, what produced it, and for a file the
    run loads again (the tokenizer's) its sha256 (`runs.DIGEST`).

    `check(name, origin)` refuses a file made from something else than `origin` (a dict of
    what matters: data digest, vocabulary size, source file digest...), or changed since it was
    made, so files left by an earlier attempt with other data or settings, or edited, are never
    reused silently.
    """

    def __init__(self, run_dir: pathlib.Path, *, writable: bool = True):
        self.run_dir = run_dir
        self.writable = writable  # False on every process but 0 of a multi-process run
        self.path = run_dir / runs.ARTEFACTS
        self.records: dict[str, dict] = runs.read_artefacts(run_dir)

    def check(self, name: str, origin: dict[str, Any]) -> bool:
        """True when `name` exists, was made from `origin` and is unchanged since; False when it
        does not exist yet.

        What a record lacks (a file written before records were kept, a key or digest recorded
        only since) is adopted from `origin` and the file as they are. Raises ValueError naming
        what differs when it was made from something else, or the file changed.
        """
        path = self.run_dir / name
        if not path.exists():
            return False
        recorded = self.records.get(name, {})
        differences = [
            f"{key}: {_short(value)} then, {_short(origin.get(key))} now"
            for key, value in sorted(recorded.items()) if key != runs.DIGEST and value != origin.get(key)
        ]
        if differences:
            raise ValueError(
                f"{path} was made from something else than this run asks for ({'; '.join(differences)}). It is "
                f"left in place: run with what made it, use another run_dir, or move it away (and the "
                f"checkpoints, if any) to start this run over."
            )
        runs.check_unchanged(self.run_dir, {name: recorded})
        if recorded.keys() - {runs.DIGEST} != origin.keys() or (runs.DIGEST not in recorded and path.is_file()):
            self.record(name, origin, path if path.is_file() else None)
        return True

    def record(self, name: str, origin: dict[str, Any], file: pathlib.Path | None = None) -> None:
        """Records `origin` for `name`, with the sha256 of `file` (the artefact, before it is moved
        into place); written atomically."""
        self.records[name] = origin if file is None else {**origin, runs.DIGEST: sha256_file(file)}
        if not self.writable:
            return
        write_atomically(self.path, json.dumps(self.records, indent=1, sort_keys=True))


def _short(value: Any) -> str:
    """A value for a message; digests shortened to 12 characters."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    return "nothing" if value is None else repr(value)
