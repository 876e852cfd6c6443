"""The environment of tests that start `python -m ...` processes.

The processes share a persistent JAX compilation cache for the test session, so a program
compiled by one run (a train step, an evaluation) is loaded, not recompiled, by the next.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CACHE_DIR = tempfile.mkdtemp(prefix="transformer-tests-jax-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a CPU child process that imports this checkout, plus `extra`."""
    return dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra,
    )
