"""The persistent compilation cache of the command-line tools (`python -m train`,
`python -m transformer.sample`): a program compiled by one run is read from disk, not compiled
again, by the next run that builds the same program (a resumed or repeated training run, the
sampler on the same model).

JAX keys each entry by the program, the devices and the compiler's version and options, so a
changed model or another jax compiles afresh. The folder holds executable code: keep it where
only you can write (JAX's warning: a shared, writable cache lets others run code as you).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = "~/.cache/transformer/jax"
MAX_BYTES = 4 << 30  # least recently used entries are evicted beyond this (JAX needs filelock for it)
MIN_COMPILE_SECONDS = 0.2  # faster compiles are not worth a file (JAX's default is 1 s)


def use_compilation_cache(directory: str = DEFAULT_DIR) -> str | None:
    """Keeps compiled programs in `directory` ("" = no cache of ours) unless the program already
    set JAX's cache up (JAX_COMPILATION_CACHE_DIR, or `jax.config`), which is left as it is; so
    are the size limit and minimum compile time the environment sets (else MAX_BYTES and
    MIN_COMPILE_SECONDS).

    Call it before anything compiles. Returns the folder in use, or None.
    JAX_ENABLE_COMPILATION_CACHE=false switches any cache off.
    """
    if jax.config.jax_compilation_cache_dir or not directory:
        return jax.config.jax_compilation_cache_dir
    path = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", path)
    for name, value in (("jax_compilation_cache_max_size", MAX_BYTES),
                        ("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)):
        if name.upper() not in os.environ:  # a setting of the environment's stays
            jax.config.update(name, value)
    return path
