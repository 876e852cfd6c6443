"""What keeps a run directory sound: one process at a time, a metrics log that survives a torn
write, and a record of what produced each artefact.

    run_dir/
      .lock             held (flock) by the process that trains; names it
      artefacts.json    for each artefact, what made it (data, tokenizer settings, source file)
      metrics.jsonl     one JSON object per line, appended

The lock is an advisory `flock`: the kernel releases it when its process exits, however it
exits, so a crashed run never leaves a lock that blocks the next one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import socket
import time
from typing import Any

from transformer.files import write_atomically


class RunDirectoryBusy(RuntimeError):
    """Raised when another process holds a run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory while a run trains (create the directory first)."""

    def __init__(self, run_dir: pathlib.Path):
        self.path = run_dir / ".lock"
        self._file = None

    def acquire(self) -> str:
        """Takes the lock; returns who held it last ("" for a new directory or a clean exit).

        Raises RunDirectoryBusy naming the holder when a live process has it.
        """
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by {holder}. Wait for that run to finish (or stop it with "
                "SIGTERM: it saves and exits), or choose another run_dir."
            ) from None
        file.seek(0)
        previous = file.read().strip()
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        file.flush()
        self._file = file
        return previous

    def release(self) -> None:
        """Frees the lock and empties the file (a non-empty file afterwards means a crashed holder)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing the descriptor releases the flock
        self._file = None

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
    """artefacts.json: for each file of the run directory, what produced it.

    `check(name, origin)` refuses a file made from something else than `origin` (a dict of
    what matters: data digest, vocabulary size, source file digest...), so files left by an
    earlier attempt with other data or settings are never reused silently.
    """

    def __init__(self, run_dir: pathlib.Path, *, writable: bool = True):
        self.run_dir = run_dir
        self.writable = writable  # False on every process but 0 of a multi-process run
        self.path = run_dir / "artefacts.json"
        self.records: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def check(self, name: str, origin: dict[str, Any]) -> bool:
        """True when `name` exists and was made from `origin`; False when it does not exist yet.

        A file without a record (written before records were kept) is adopted with `origin`.
        Raises ValueError naming what differs when it was made from something else.
        """
        if not (self.run_dir / name).exists():
            return False
        recorded = self.records.get(name)
        if recorded is None:
            self.record(name, origin)
            return True
        differences = [
            f"{key}: {_short(recorded.get(key))} then, {_short(origin.get(key))} now"
            for key in sorted(set(recorded) | set(origin)) if recorded.get(key) != origin.get(key)
        ]
        if differences:
            raise ValueError(
                f"{self.run_dir / name} was made from something else than this run asks for "
                f"({'; '.join(differences)}). It is left in place: use another run_dir, or move it away "
                f"(and the checkpoints, if any) to start this run over."
            )
        return True

    def record(self, name: str, origin: dict[str, Any]) -> None:
        """Records `origin` for `name` (written atomically, before the artefact is moved into place)."""
        self.records[name] = origin
        if not self.writable:
            return
        write_atomically(self.path, json.dumps(self.records, indent=1, sort_keys=True))


def _short(value: Any) -> str:
    """A value for a message; digests shortened to 12 characters."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    return "nothing" if value is None else repr(value)
