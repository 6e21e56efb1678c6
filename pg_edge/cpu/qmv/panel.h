// The weight panels of the AVX2 GEMMs (qmm_int8_avx2.cpp, qmm_int16.cpp): 16 weight rows, each
// unpacked to int32 columns (4 int8 weights or 2 int16 ones per column), transposed so that
// column c of all 16 rows is one line of 16 int32 lanes: panel[c * 16 + r] = row r's column c.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#ifdef QMV_X86
#include <immintrin.h>

namespace pg_edge {

// rows: 16 rows of `cols` int32 columns each, `stride` int32 apart; cols a multiple of 8.
__attribute__((target("avx2"))) inline void transpose_panel(const int32_t* rows, int stride, int cols,
                                                            int32_t* panel) {
  for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 -> lanes 8h .. 8h + 7 of each line
    const int32_t* src = rows + static_cast<size_t>(8 * h) * stride;
    for (int c = 0; c < cols; c += 8) {
      __m256i r[8], t[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + static_cast<size_t>(i) * stride + c));
      }
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i) {  // rows 4i .. 4i + 3, within each 128-bit half
        r[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      for (int i = 0; i < 4; ++i) {  // column c + i from the low halves, c + 4 + i from the high
        const __m256i lo = _mm256_permute2x128_si256(r[i], r[4 + i], 0x20);
        const __m256i hi = _mm256_permute2x128_si256(r[i], r[4 + i], 0x31);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + static_cast<size_t>(c + i) * 16 + 8 * h), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel + static_cast<size_t>(c + 4 + i) * 16 + 8 * h), hi);
      }
    }
  }
}

}  // namespace pg_edge
#endif
