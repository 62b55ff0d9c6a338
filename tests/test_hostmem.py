"""Freed memory kept for reuse (dalign_jax/hostmem.py): the environment it sets, and that glibc then
serves a second large allocation without new page faults."""
import json
import os
import subprocess
import sys

import pytest

from dalign_jax.hostmem import HEAP_REUSE_TUNABLES, OPT_OUT, heap_reuse_environment, heap_reuse_supported

# Run by the child: re-exec as `dalign` does, then malloc and write 256 MB twice, freeing it between.
CHILD = """
import ctypes, json, os, resource
from dalign_jax.hostmem import reexec_with_heap_reuse
reexec_with_heap_reuse()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
print(json.dumps({"faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES", ""), "pid": os.getpid()}))
"""


def test_tunables_are_added_to_the_users_own():
    env = heap_reuse_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == ":".join(("glibc.malloc.tcache_count=0",) + HEAP_REUSE_TUNABLES)
    assert heap_reuse_environment({})["GLIBC_TUNABLES"] == ":".join(HEAP_REUSE_TUNABLES)


def test_nothing_changes_when_set_already_or_opted_out():
    assert heap_reuse_environment({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"}) is None
    assert heap_reuse_environment({OPT_OUT: "1"}) is None
    assert heap_reuse_environment({OPT_OUT: "0"}) is not None


def _child(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    if opt_out:
        env[OPT_OUT] = "1"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["pid"] == proc.pid  # replaced in place: a signal to the started process still reaches it
    return report


@pytest.mark.skipif(not heap_reuse_supported(), reason="glibc tunables only")
def test_a_second_large_allocation_reuses_the_first_ones_pages():
    pages = (256 << 20) // 4096
    reused = _child(opt_out=False)
    assert reused["tunables"] == ":".join(HEAP_REUSE_TUNABLES)
    assert reused["faults"][0] > pages // 2  # the first touch of new memory faults either way
    assert reused["faults"][1] < pages // 50  # the freed block was kept and served again
    plain = _child(opt_out=True)
    assert plain["tunables"] == ""
    assert plain["faults"][1] > pages // 2  # glibc's default unmaps it on free and maps it anew
