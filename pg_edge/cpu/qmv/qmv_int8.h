// pg_edge's decode products of large 4-bit weights with x in int8, on AVX512-VNNI (qmv_int8.cpp
// has the layout and the maths). qmv.cpp's primitive calls it; elsewhere its float32 kernels run.
#pragma once

#include <cstdint>

#include "mlx/array.h"

namespace pg_edge {

// Weights of fewer elements (N * K) keep the float32 kernels: their products are cheap, and the
// small models' outputs (tests, the demo model) stay the same on every x86 CPU.
constexpr int64_t kInt8MinElements = int64_t{1} << 20;

// Whether this CPU and process run the int8 kernel at all: AVX-512 F/BW + AVX512-VNNI, not capped
// by PG_EDGE_QMV_SIMD, and PG_EDGE_DECODE not "float32" (or "off", "0").
bool int8_available();
// "int8 on AVX512-VNNI" or "float32": what int8_available() means, in words.
const char* decode_kernel();

// One product: x float32 [M, K] row-contiguous; w uint32 [N, K * bits / 32], scales and biases
// [N, K / gs] (float32 / bfloat16 / float16, row-contiguous), MLX's affine layout.
struct Int8Product {
  int M, N, K, gs, bits;
  const float* x;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  mlx::core::Dtype sdt;
};

// Whether `p` takes the int8 kernel: int8_available(), 4 bits, N * K >= kInt8MinElements, K a
// multiple of 128 (one 64-byte block of a weight row).
bool int8_applies(const Int8Product& p);

// out[m * N + n] (float32) = the product, x rounded to int8 per group of gs; false (out
// untouched) when a row of x holds inf or NaN, for the caller's float32 kernel to run instead.
bool int8_matvec(const Int8Product& p, float* out);

}  // namespace pg_edge
