"""How the process's C allocator serves the large tensors of a CPU meta-step.

glibc's ``malloc`` gives every block above its mmap threshold (at most 32 MiB) its own
``mmap`` and returns it to the system on ``free``; the next step asks again, and the kernel
zero-fills every page of it on first touch. A second-order MAML step at 84×84 allocates and
frees activations of 68 MB (75 queries × 32 × 84 × 84 floats) dozens of times, so much of its
time went to page faults. :func:`keep_freed_memory` has the heap serve those blocks too and
keep what is freed, so that the steps of a loop soon find their memory already mapped: the
same computation, bit for bit, 1.10–1.28× faster there (1.03–1.11× at 28×28), for a peak
resident set of 1.1 GiB instead of 0.9–1.0 GiB, steady over 150 steps (docs/benchmarks.md,
``scripts/bench_malloc.py``).
PyTorch's CPU tuning guide makes the same point for jemalloc and tcmalloc; this needs no
other library.

The ``fewshot-nsl`` command applies it at start (:func:`apply_allocator_policy`);
``FEWSHOT_NSL_MALLOC=system`` leaves the allocator as it is. Elsewhere (musl, macOS,
Windows) nothing changes. Library users may call :func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Environment variable choosing the policy: ``keep`` (default) or ``system``.
MALLOC_ENV = "FEWSHOT_NSL_MALLOC"
MALLOC_POLICIES = ("keep", "system")
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Freed memory at the top of the heap kept for reuse rather than returned (bytes; mallopt
#: takes an int).
TRIM_THRESHOLD = 2**31 - 1


class AllocatorPolicyError(ValueError):
    """``FEWSHOT_NSL_MALLOC`` holds something other than a known policy."""


def allocator_policy() -> str:
    """The policy ``FEWSHOT_NSL_MALLOC`` asks for (``keep`` when unset)."""
    policy = os.environ.get(MALLOC_ENV, "keep").strip().lower() or "keep"
    if policy not in MALLOC_POLICIES:
        raise AllocatorPolicyError(
            f"{MALLOC_ENV}={os.environ[MALLOC_ENV]!r}: expected one of {', '.join(MALLOC_POLICIES)}"
        )
    return policy


def _glibc_mallopt():
    """The ``mallopt`` of the C library this process runs on, or None where it is not glibc.
    Looked up among the process's own symbols: the allocator that serves torch is the one to
    set (``ctypes.util.find_library`` would name a file, and reads the loader cache to do it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap (no per-block ``mmap``) and keep freed memory
    for reuse (module docstring). Returns whether glibc accepted both settings; False, with
    nothing changed, on other C libraries. Results do not change: only where memory comes
    from."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def apply_allocator_policy() -> bool:
    """:func:`keep_freed_memory` unless ``FEWSHOT_NSL_MALLOC=system``; whether it applied."""
    return allocator_policy() == "keep" and keep_freed_memory()
