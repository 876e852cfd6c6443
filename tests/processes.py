"""The environment of tests that start `python -m ...` processes.

The processes share a persistent JAX compilation cache for the test session (with the test
processes themselves, conftest.py: pytest-xdist's workers inherit the folder from the process
that starts them), so a program compiled by one run (a train step, an evaluation) is loaded,
not recompiled, by the next. A size limit turns on JAX's file lock around every read and
write of the cache, which the processes share.

Programs that compile in under 50 ms (each operation of an un-jitted `model.apply`, the
smallest jits) are compiled again rather than written: with the size limit every write lists
the whole cache to evict by age, so writing each of the suite's many thousand tiny programs
made the writes quadratic (an eager test of 7 s alone took 42 s late in the full suite, and
the suite 1173 s where it now takes 1076).
"""

import atexit
import os
import pathlib
import shutil
import socket
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SHARED = "TRANSFORMER_TESTS_JAX_CACHE"  # set by the first test process for those it starts
if _SHARED not in os.environ:
    os.environ[_SHARED] = tempfile.mkdtemp(prefix="transformer-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ[_SHARED], ignore_errors=True)


# Every program that took 50 ms or more to compile is cached, however small.
CACHE_SETTINGS = {
    "jax_compilation_cache_dir": os.environ[_SHARED], "jax_persistent_cache_min_compile_time_secs": 0.05,
    "jax_persistent_cache_min_entry_size_bytes": 0, "jax_compilation_cache_max_size": 2**32,
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a CPU child process that imports this checkout, plus `extra` (which may
    replace the cache settings, e.g. JAX_COMPILATION_CACHE_DIR="" for a process on its own cache)."""
    cache = {name.upper(): str(value) for name, value in CACHE_SETTINGS.items()}
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **cache, **extra}


def free_port() -> int:
    """A TCP port nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
