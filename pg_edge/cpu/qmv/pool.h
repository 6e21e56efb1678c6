// The thread pool both of pg_edge's matvec primitives (qmv.cpp, fmv.cpp) split output rows over.
#pragma once

#include <cstdint>
#include <functional>

namespace pg_edge {

// Threads a product is split over (PG_EDGE_QMV_THREADS, else the cores this process may use,
// at most 8).
int threads();

// How long (microseconds) a worker polls for the next job, and a caller for the workers, before
// sleeping: PG_EDGE_QMV_SPIN_US at start, else 200. `us` >= 0 sets it (at most 100000); returns
// the value before.
int spin_microseconds(int us = -1);

// Calls rows(lo, hi) over [0, N) in chunks spread over the pool's threads and the caller, or
// once on the caller when `work` (multiply-adds) is too small to pay for waking the pool.
// `align` rounds the chunk size up to a multiple (a kernel's block of output rows).
void split_rows(int N, int64_t work, int align, const std::function<void(int, int)>& rows);

// Calls units(lo, hi) over [0, n) with one unit per chunk (attn.cpp: a decode attention's
// (row, head) pairs, 8 for one PaliGemma 2 row), or once on the caller when `work` is small.
void split_units(int n, int64_t work, const std::function<void(int, int)>& units);

}  // namespace pg_edge
