"""Host memory: keep freed memory in the process for the next compiled step (Linux, glibc).

XLA:CPU allocates each execution's temporary buffers afresh (2.6 GB for an SFT step of the default
model at 4 x 256 tokens) and frees them at its end. glibc's malloc serves allocations that large with
mmap, or from a per-thread arena that itself maps them, and unmaps them when freed, so every step
touches gigabytes of fresh pages: the kernel zeroes each 4 KiB page on its first write, about 645,000
page faults per SFT step, a fifth of the step on the 2-core development machine. With one arena, no
mmap and no trimming, freed memory goes back to malloc's heap and the next step reuses it (no fault
after the first step). That is what jemalloc or tcmalloc under LD_PRELOAD do for PyTorch on CPUs,
with glibc's own documented tunables and nothing to install.

The tunables are read when a process starts, so `reexec_with_heap_reuse` runs the same command again
with them set; `dalign sft`, `dalign rl` and tools/bench_sft.py call it before anything else, and
`dalign run` runs those two stages as such child processes (the sampler is slower with one arena: see
cli.HEAP_REUSE_COMMANDS). The price: the process keeps its peak heap until it exits.
`DALIGN_SYSTEM_MALLOC=1` leaves malloc as it is.
"""
from __future__ import annotations

import os
import platform
import sys

HEAP_REUSE_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                       "glibc.malloc.trim_threshold=68719476736")
OPT_OUT = "DALIGN_SYSTEM_MALLOC"


def heap_reuse_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with the heap-reuse tunables added to GLIBC_TUNABLES, or None when nothing is to
    change: opted out, or GLIBC_TUNABLES already says how malloc maps memory (we set it, or the user)."""
    if environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_max" in current:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, *HEAP_REUSE_TUNABLES]))}


def heap_reuse_supported() -> bool:
    """Linux with glibc, whose malloc reads the tunables."""
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def reexec_with_heap_reuse() -> None:
    """Replace this process with the same command under the heap-reuse tunables (same pid, same
    arguments), unless they are set already, opted out of, or this is not Linux with glibc. Call it
    first thing: output written before it would be lost."""
    if not heap_reuse_supported():
        return
    environ = heap_reuse_environment(dict(os.environ))
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
