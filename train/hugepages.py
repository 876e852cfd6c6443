"""Host memory in transparent huge pages, for training on a CPU.

XLA:CPU allocates a program's temporary buffers afresh at every call. With glibc's malloc the
large ones are mapped from the kernel at each call and unmapped after it, so every training
step faults its working memory in again, 4 KiB at a time: 59,000 page faults (240 MB) a step
for a 5M-parameter GPT at batch 8 x 256, 12-15% of its time on a 2-core CPU (benchmarks/RESULTS.md).
glibc's `glibc.malloc.hugetlb=1` tunable backs those mappings with 2 MiB pages instead: about
500 faults a step. Decoding (one program, its loop inside) is unaffected, and so is a GPU's
device memory.

glibc reads its tunables once, when the process starts, so the setting needs a fresh process:
`reexec_with_huge_pages` restarts the command-line entry points once with it. Elsewhere, set it
yourself: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py` (or preload tcmalloc,
whose caches keep the buffers mapped).
"""

from __future__ import annotations

import os
import sys

TUNABLES = "glibc.malloc.hugetlb=1"


def reexec_with_huge_pages() -> None:
    """Restarts this process once, with the same interpreter and arguments, with `TUNABLES` in
    GLIBC_TUNABLES; returns at once on other systems than Linux, and when GLIBC_TUNABLES is
    already set (so `GLIBC_TUNABLES= python -m train ...`, set but empty, opts out).

    Call it first in a command-line entry point, before threads start or files open: the
    process image is replaced (same PID), and what the process did before is lost. Linux
    without glibc, an older glibc (before 2.35) and transparent huge pages switched off
    (`never` in /sys/kernel/mm/transparent_hugepage/enabled) ignore the setting.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
