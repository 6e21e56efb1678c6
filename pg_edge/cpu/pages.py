"""The weights' memory on 2 MB pages (Linux), so that decode's weight streams read faster.

A decode step reads every weight once, row after row: PaliGemma 2 3B at 4 bits streams about
1.5 GB a token. On 4 KB pages that stream crosses a page every 4 KB: the CPU's hardware
prefetchers stop at each page boundary and every page costs a TLB miss, so one core read a
quantized product's weights at a third of its plain read bandwidth. On 2 MB pages the same
kernels read faster (docs/performance.md, "Weights on 2 MB pages").

MLX allocates a weight with malloc, which maps fresh 4 KB pages; Linux's transparent huge pages
are, by default on most distributions, given only where a program asks (`madvise`). Once the
weights are in memory, `settle(model)` asks the kernel to rebuild the 2 MB pages that hold each
weight's buffer (`madvise(MADV_COLLAPSE)`, Linux 6.1+): the same addresses and contents, no
extra memory beyond one 2 MB page at a time, nothing for MLX to know. malloc's buffers do not
start on a 2 MB boundary, so a buffer's first and last 2 MB page also hold the ends of its
neighbours (the same mapping: their contents are kept as they were); where that range is not
all mapped, only the whole 2 MB pages inside the buffer are rebuilt. On kernels before 6.1,
where the call is unknown, the buffers are marked `MADV_HUGEPAGE` instead: the kernel's
background thread (khugepaged) then rebuilds them over time. Elsewhere (macOS, Windows, GPU
memory) nothing is done.

PG_EDGE_HUGEPAGES=off leaves the pages as they are.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

HUGE = 2 << 20  # the x86-64 / arm64 (4 KB base page) transparent huge page size
MIN_BYTES = 256 << 10  # smaller weights (norms, biases) are few bytes of a step; skipping them saves calls
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>

# What the last settle() did, for `pg-edge bench` and the tests: bytes on 2 MB pages, how.
last: dict = {"bytes": 0, "how": "not run", "seconds": 0.0}


def enabled() -> bool:
    """Linux, and not turned off by PG_EDGE_HUGEPAGES=off|0|false."""
    flag = os.environ.get("PG_EDGE_HUGEPAGES", "").strip().lower()
    return sys.platform.startswith("linux") and flag not in ("off", "0", "false", "no")


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _address(a: mx.array) -> int:
    """Where an evaluated, row-contiguous array's data starts. A bit-cast view shares the
    buffer (numpy has no bfloat16 to read it as)."""
    import numpy as np

    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.view(mx.uint16)
    return np.array(a, copy=False).ctypes.data


def aligned_range(start: int, nbytes: int) -> tuple[int, int]:
    """(first, end) of the whole 2 MB pages inside [start, start + nbytes); first >= end if none."""
    first = (start + HUGE - 1) // HUGE * HUGE
    end = (start + nbytes) // HUGE * HUGE
    return first, end


def covering_range(start: int, nbytes: int) -> tuple[int, int]:
    """(first, end) of the 2 MB pages that [start, start + nbytes) touches."""
    return start // HUGE * HUGE, (start + nbytes + HUGE - 1) // HUGE * HUGE


def _ranges(model) -> list[tuple[int, int]]:
    """Each large evaluated weight's buffer as (start, nbytes), one entry per buffer."""
    out, seen = [], set()
    for _, a in tree_flatten(model.parameters()):
        if a.nbytes < MIN_BYTES:
            continue
        try:
            start = _address(a)
        except (ValueError, TypeError):  # not readable in place: leave it
            continue
        if start not in seen:  # two names for one buffer (tied weights)
            seen.add(start)
            out.append((start, a.nbytes))
    return out


def _collapse(madvise, start: int, nbytes: int) -> tuple[int, int]:
    """(bytes now on 2 MB pages, errno of the failure or 0) for one buffer. First the 2 MB pages
    that cover it whole: its first and last page hold the neighbouring buffers' ends too, which
    stay as they were, only on one 2 MB page (malloc's neighbours lie in the same mapping);
    where the kernel refuses that range (part of it unmapped, or in a mapping of another kind
    next to a buffer that has a mapping of its own: ENOMEM or EINVAL), the pages inside the
    buffer only. A kernel without MADV_COLLAPSE answers EINVAL to both."""
    first, end = covering_range(start, nbytes)
    if madvise(first, end - first, MADV_COLLAPSE) == 0:
        return nbytes, 0
    err = ctypes.get_errno()
    first, end = aligned_range(start, nbytes)
    if end <= first:
        return 0, err
    if madvise(first, end - first, MADV_COLLAPSE) == 0:
        return end - first, 0
    return 0, ctypes.get_errno()


def settle(model) -> dict:
    """Put `model`'s large evaluated weights on 2 MB pages (see the module docstring); returns
    {"bytes": how much now sits on them (or was marked for them), "how": "collapse" |
    "hugepage" | "off" | "unavailable" | "not run", "seconds": the time it took}. Safe to call
    more than once: pages already on 2 MB cost nothing the second time."""
    global last
    t0 = time.perf_counter()
    if mx.default_device().type != mx.cpu:  # GPU memory: not the CPU's pages
        last = {"bytes": 0, "how": "not run", "seconds": 0.0}
        return last
    if not enabled():
        last = {"bytes": 0, "how": "off", "seconds": 0.0}
        return last
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        last = {"bytes": 0, "how": "unavailable", "seconds": 0.0}
        return last
    ranges = _ranges(model)
    # One thread: the kernel takes the process's memory-map lock to install each 2 MB page, and
    # neighbouring buffers share their edge pages, so threads mostly wait on each other.
    results = [_collapse(madvise, start, nbytes) for start, nbytes in ranges]
    total = sum(b for b, _ in results)
    how = "collapse"
    if ranges and all(err == errno.EINVAL for _, err in results):  # a kernel before 6.1: khugepaged will
        how, total = "hugepage", 0
        for start, nbytes in ranges:
            first, end = covering_range(start, nbytes)
            if madvise(first, end - first, MADV_HUGEPAGE) == 0:
                total += nbytes
    last = {"bytes": total, "how": how if total else "unavailable", "seconds": time.perf_counter() - t0}
    return last


def describe() -> str:
    """One line for `pg-edge bench`: what settle() did for the loaded model."""
    b, how = last["bytes"], last["how"]
    if how == "collapse":
        return f"{b / 1e9:.2f} GB of weights on 2 MB pages (madvise MADV_COLLAPSE, {last['seconds']:.1f} s at load)"
    if how == "hugepage":
        return f"{b / 1e9:.2f} GB of weights marked for 2 MB pages (MADV_HUGEPAGE; the kernel has no MADV_COLLAPSE)"
    if how == "off":
        return "4 KB pages (PG_EDGE_HUGEPAGES=off)"
    if how == "unavailable":
        return "4 KB pages (no large weight could be moved to 2 MB pages)"
    return "4 KB pages (not a Linux CPU run)"
