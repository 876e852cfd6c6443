"""Host memory in transparent huge pages, for training on a CPU.

XLA:CPU allocates a program's temporary buffer afresh at every call, and glibc's malloc maps a
block that large from the kernel and unmaps it when it is freed: every training step faults
its working memory in again, 4 KiB at a time. glibc's `glibc.malloc.hugetlb=1` tunable backs
such blocks with 2 MiB pages, which makes training steps on a CPU about 12% faster
(benchmarks/RESULTS.md, "Host memory in huge pages"). glibc reads its tunables when a process
starts, so `reexec_with_huge_pages` restarts a command-line entry point once with it. In your
own scripts, set it when you start them: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"


def reexec_with_huge_pages() -> None:
    """Restarts this program once, with the same interpreter, options and arguments, with
    `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES.

    Returns at once where that cannot help or would restart something else: when
    GLIBC_TUNABLES already names the tunable (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts
    out), on anything but Linux with glibc 2.35 or later and transparent huge pages switched
    on, and when this program is not what the interpreter was started with (run from a
    notebook or by `runpy`). The process image is replaced (same PID) and what the process did
    before is lost, so call it early in a command-line entry point.
    """
    previous = os.environ.get("GLIBC_TUNABLES")
    if f"{TUNABLE}=" in (previous or "") or not _glibc_with_hugetlb() or not _started_as_this_program():
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [previous, f"{TUNABLE}=1"]))
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # an optimisation only: carry on as started
        if previous is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = previous


def _glibc_with_hugetlb() -> bool:
    """Linux with glibc 2.35 or later (the tunable's first release), huge pages not `never`."""
    if sys.platform != "linux":
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as modes:
            switched_off = "[never]" in modes.read()
    except (ValueError, AttributeError, OSError):  # another C library, no such file
        return False
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35) and not switched_off


def _started_as_this_program() -> bool:
    """Whether the interpreter was started with this program (`python -m package` or `python
    script.py`) and its arguments; not so under a notebook kernel, or when `runpy` runs it
    inside another program."""
    arguments = sys.argv[1:]
    start = len(sys.orig_argv) - len(arguments) - 1  # where the program stands in the command
    if not sys.executable or start < 1 or sys.orig_argv[start + 1:] != arguments:
        return False
    program = sys.orig_argv[start]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if sys.orig_argv[start - 1] == "-m" and spec is not None:
        return spec.name in (program, f"{program}.__main__")
    return os.path.isfile(program) and os.path.samefile(program, sys.argv[0])
