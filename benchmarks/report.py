"""The JSON every benchmark script writes (its rows plus where and when they were measured), and
the JSON line a script run as a process of its own answers with."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax


def write_results(path: str | pathlib.Path, rows: list[dict], **meta) -> None:
    """Writes {"meta": {device, backend, jax, host, date, glibc_tunables, **meta}, "rows": rows} to
    `path` (glibc_tunables: the GLIBC_TUNABLES the process ran with; see train.hugepages)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
        "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), **meta,
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


def in_own_process(script: str, *args: str) -> object:
    """Runs `python script args...` in a fresh process (so that its threads share no process with
    this one's) and returns the JSON value its last line of output holds."""
    command = [sys.executable, script, *args]
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = process.stdout.strip().splitlines()
    if process.returncode or not lines:
        raise SystemExit(f"A benchmark process failed (exit status {process.returncode}): {' '.join(command)}")
    return json.loads(lines[-1])
