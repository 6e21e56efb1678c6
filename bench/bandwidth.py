"""This machine's memory read bandwidth, the decode roofline: a NumPy streaming read.

    python bench/bandwidth.py            # GB/s, two threads, over a 1 GiB buffer

Each thread sums its own half of a buffer much larger than any cache (NumPy's reductions release
the GIL, so the threads read at once); GB/s = bytes read / wall time, the best of `repeat`
passes. Decode of a model whose weights are W bytes can at best run at bandwidth / W tokens per
second (every weight read once per token); bench/vs_peers.py reports decode as a fraction of it.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np


def read_gbs(mib: int = 1024, threads: int = 2, repeat: int = 5) -> float:
    """Best read bandwidth in GB/s of `threads` threads summing disjoint parts of a `mib` MiB
    buffer of int64 (an integer sum: the adds never limit it, the reads do)."""
    buf = np.ones(mib * 2**20 // 8, dtype=np.int64)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeat):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t) / 1e9)
    return best


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"read bandwidth, {n} thread(s), 1 GiB buffer: {read_gbs(threads=n):.1f} GB/s")
