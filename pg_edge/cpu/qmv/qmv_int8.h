// pg_edge's decode products of large 4-bit weights with x in int8, on AVX512-VNNI or AVX2
// (qmv_int8.cpp has the layout and the maths). qmv.cpp's primitive calls it; elsewhere (no AVX2,
// not x86) its float32 kernels run.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/array.h"

namespace pg_edge {

// Weights of fewer elements (N * K) keep the float32 kernels: their products are cheap, and the
// small models' outputs (tests, the demo model) stay the same on every x86 CPU.
constexpr int64_t kInt8MinElements = int64_t{1} << 20;

// 2: AVX-512 F/BW + AVX512-VNNI; 1: AVX2 (or PG_EDGE_QMV_SIMD=avx2 capping the first); 0: none
// (no AVX2, not x86, PG_EDGE_DECODE "float32" / "off" / "0"). Read once.
int int8_level();
// Whether this CPU and process run the int8 kernel at all: int8_level() > 0.
bool int8_available();
// "int8 on AVX512-VNNI", "int8 on AVX2" or "float32": int8_level() in words.
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
// multiple of a kernel's block: 128 elements on AVX512-VNNI, else 64 (the AVX2 kernel, which an
// AVX512-VNNI CPU runs too for K a multiple of 64 but not of 128).
bool int8_applies(const Int8Product& p);

// out[m * N + n] (float32) = the product, x rounded to int8 per group of gs; false (out
// untouched) when a row of x holds inf or NaN, for the caller's float32 kernel to run instead.
bool int8_matvec(const Int8Product& p, float* out);

// Several products of the same x (the same M, K, group size and bits), out[i] for ps[i]: x is
// rounded once and the rows of all weights split over the pool as one range. False (outs
// untouched) as int8_matvec. Each ps[i] must pass int8_applies.
bool int8_matvecs(const std::vector<Int8Product>& ps, const std::vector<float*>& outs);

// The same product over many x rows (prefill), in qmm_int8.cpp's GEMM layout; AVX512-VNNI only
// (false, out untouched, elsewhere or when x holds inf / NaN).
bool int8_matmul(const Int8Product& p, float* out);

// The same on AVX2 (qmm_int8_avx2.cpp): int8_level() >= 1, gs a multiple of 32 (false, out
// untouched, otherwise or when x holds inf / NaN).
bool int8_matmul_avx2(const Int8Product& p, float* out);

// x rounded for both GEMMs, as qmv_int8.cpp rounds it: xq [M, K] int8 in order, sx [M, G] the
// step max|x_g| / 127, xsum [M, G] the float32 sums of x, xr [M, G] 8 * (xsum - sx * the sum of
// the group's xq).
struct Int8Rows {
  std::vector<int8_t> xq;
  std::vector<float> sx, xsum, xr;
};

// p.x rounded into r (sized here), rows over the pool, in AVX2 (qmm_int8_avx2.cpp; its cost is
// M * K against the GEMM's M * N * K); false when a group's largest |x| or its sum is not finite.
bool round_int8_rows(const Int8Product& p, Int8Rows& r);

// Rows [n0, n0 + rows) of p's 4-bit weight unpacked to one byte a weight ([lanes][K], in order;
// rows past `rows` zero) and their scales / biases to sct / bit ([G][lanes] float32), for the
// GEMMs' panels to transpose (qmm_int8_avx2.cpp; x86 only). tmp: G floats; K % 64 == 0.
void unpack_int4_rows(const Int8Product& p, int n0, int rows, int lanes, uint8_t* bytes, float* sct, float* bit,
                      float* tmp);

}  // namespace pg_edge
