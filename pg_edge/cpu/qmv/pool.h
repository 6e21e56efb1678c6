// The thread pool both of pg_edge's matvec primitives (qmv.cpp, fmv.cpp) split output rows over.
#pragma once

#include <cstdint>
#include <functional>

namespace pg_edge {

// Threads a product is split over (PG_EDGE_QMV_THREADS, else the cores this process may use,
// at most 8).
int threads();

// Calls rows(lo, hi) over [0, N) in chunks spread over the pool's threads and the caller, or
// once on the caller when `work` (multiply-adds) is too small to pay for waking the pool.
// `align` rounds the chunk size up to a multiple (a kernel's block of output rows).
void split_rows(int N, int64_t work, int align, const std::function<void(int, int)>& rows);

}  // namespace pg_edge
