// What bf16_gemm.cpp shares with its inner kernels (amx.cpp; qmm_bf16dot.cpp, qmm_int16.cpp): the
// job, the weight blocks, a 16 x 16 transpose. x86-64 Linux only (QMV_BF16); elsewhere nothing here is built.
#pragma once

#include <cstdint>

#include "common.h"
#include "mlx/dtype.h"

#if defined(QMV_X86) && defined(__linux__)
#define QMV_BF16 1
#include <immintrin.h>
#endif

namespace pg_edge::bf16 {

constexpr int SB = 320;   // weight rows per superblock (a multiple of 32)
constexpr int KC = 1024;  // k per chunk (a multiple of 128: whole quantization groups, whole tiles)

struct Job {
  int M, N, K, Mp, Kp;   // Mp: M rounded up to 16, Kp: K rounded up to 32
  const uint32_t* x;     // x in bfloat16 pairs as [Mp / 16][Kp / 32] AMX B tiles (bf16_gemm.cpp)
  const uint16_t* w16;   // bfloat16 / float16 [N, K], row-contiguous (or null: quantized)
  bool fp16;
  const uint8_t* wq;     // quantized: the packed words as bytes, with scales / biases [N, K / gs]
  const void* scales;
  const void* biases;
  mlx::core::Dtype sdt = mlx::core::float32;
  int gs, bits;
  float* out;            // [M, N]
};

#ifdef QMV_BF16

#define BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

inline __mmask16 first(int n) {
  return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1));
}

// r[i] (16 rows of 16 32-bit values) := its transpose.
BF16_ATTR inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[c + 8] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xdd);
  }
}

// Rows [n0, n0 + nrows) and k [k0, k0 + kn) of the weight in bfloat16, as 16-row x 32-k tiles
// ws[nb][s] (1 KB each: row r of the tile is weight row n0 + 16 nb + r, k0 + 32 s .. + 31);
// kcp = kn rounded up to 32; rows past nrows and k past kn are zero. tmp: KC + 32 floats.
void fill_w(const Job& j, int n0, int nrows, int k0, int kn, int kcp, uint16_t* ws, float* tmp);

// The product's output rows [lo, hi) (weight rows), x packed (bf16_gemm.cpp).
void rows_amx(const Job& j, int lo, int hi);

#endif

// The whole product of j in int16 (qmm_int16.cpp), x float32 [M, K]; false (j.out untouched)
// when it does not apply (int16_applies) or x holds inf / NaN.
bool int16_run(const Job& j, const float* x);

// The whole product of j by VDPBF16PS (qmm_bf16dot.cpp), x float32 [M, K]; false (j.out
// untouched) when it does not apply (bf16dot_applies, bf16_gemm.h).
bool dot_run(const Job& j, const float* x);

}  // namespace pg_edge::bf16
