// What pg_edge's matvec primitives (qmv.cpp, fmv.cpp) share besides the pool: the SIMD level
// this CPU runs, and float32 <-> MLX float dtype conversions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "mlx/array.h"

#if defined(__x86_64__) || defined(_M_X64)
#define QMV_X86 1
#endif

namespace pg_edge {

// 0 portable, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL), read once: the best this CPU has, capped by
// PG_EDGE_QMV_SIMD=avx2|portable (tests, comparisons).
int cpu_simd();
// Whether the CPU converts float16 in hardware (F16C: AVX2 kernels of float16 weights).
bool cpu_f16c();
// "avx512", "avx2" or "portable": cpu_simd() in words.
const char* simd();
// Whether the environment variable `name` is set to one of `values` (the kernels' switches,
// PG_EDGE_PREFILL and PG_EDGE_DECODE, read once by each kernel's availability check).
bool env_is(const char* name, std::initializer_list<const char*> values);

// One thread's scratch of n floats on cache lines of its own. The row kernels rewrite their weight
// row's scales and biases into such a buffer for every row; where two threads' small heap
// vectors shared a line, each write took the line from the other core and a 2-thread product ran
// at a third of its speed (docs/performance.md, "Decode with int8 activations").
class LineScratch {
 public:
  explicit LineScratch(size_t n) : buf_(n + 48) {
    p_ = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf_.data()) + 127) / 64 * 64);
  }
  float* data() { return p_; }

 private:
  std::vector<float> buf_;  // 64+ bytes free before p_ and after p_[n - 1]
  float* p_;
};

// Element i of p (float32 / bfloat16 / float16) as float32.
float to_float(const void* p, mlx::core::Dtype t, size_t i);
// n values from p + off into dst as float32 (one type switch, then a loop the compiler
// vectorises: bfloat16 -> float32 is a 16-bit shift).
void load_floats(const void* p, mlx::core::Dtype t, size_t off, int n, float* dst);
// x [..., K] (any strides, float32 / bfloat16 / float16) as float32 rows [M, K], M = size / K.
std::vector<float> read_rows(const mlx::core::array& x);
// out (allocated, row-contiguous, float32 / bfloat16 / float16) = src, src holding out.size().
void write_out(mlx::core::array& out, const float* src);

// One weight row's scales and biases at a time, in float32, on the thread's own cache lines
// (LineScratch): the row kernels (qmv.cpp, qmv_int8.cpp) load row n before its blocks.
class RowScales {
 public:
  RowScales(const void* scales, const void* biases, mlx::core::Dtype t, int groups)
      : scales_(scales), biases_(biases), t_(t), groups_(groups), buf_(2 * static_cast<size_t>(groups)) {}
  // scales and biases [N, groups] row n.
  void load(int n) {
    const size_t at = static_cast<size_t>(n) * groups_;
    load_floats(scales_, t_, at, groups_, buf_.data());
    load_floats(biases_, t_, at, groups_, buf_.data() + groups_);
  }
  const float* scales() { return buf_.data(); }
  const float* biases() { return buf_.data() + groups_; }

 private:
  const void* scales_;
  const void* biases_;
  mlx::core::Dtype t_;
  int groups_;
  LineScratch buf_;
};

}  // namespace pg_edge
