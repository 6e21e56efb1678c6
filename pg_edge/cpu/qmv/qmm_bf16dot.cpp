// pg_edge's many-row (prefill) products of bfloat16 / float16 and quantized weights on CPUs with
// AVX512-BF16 but no AMX (AMD Zen 4 / Zen 5, Intel Cooper Lake): the kernel of bf16_gemm.cpp's
// primitives there (see bf16_gemm.h). VDPBF16PS multiplies 16 pairs of bfloat16 into 16 float32
// sums in one instruction, twice the products of a float32 FMA and of the int16 kernel's 256-bit
// VPDPWSSD (qmm_int16.cpp); docs/performance.md, "Prefill on AVX512-BF16".
//
// out[m, n] = sum_k bf16(x[m, k]) * bf16(w[n, k]),  sums in float32.
//
// The numbers are those of the AMX kernel (amx.cpp): x rounded to bfloat16 (to nearest even),
// bfloat16 weights as stored, float16 ones rounded to bfloat16, 4/8-bit ones dequantized (dq.cpp)
// and rounded to bfloat16. Infinities and NaN pass through as they do in float32. (Prefill sends
// 4-bit weights to the int8 GEMM, qmm_int8.cpp, faster still: pg_edge.cpu.qmv.bf16_prefill.)
//
// Layout: each thread takes its weight rows 32 at a time (a panel: two 16-lane vectors) and K in
// chunks of KC; per chunk the panel's rows are written as bfloat16 and transposed so that lane r
// of line p holds row r's pair (k = 2p, 2p + 1) (panel.h). A tile of up to TILE x rows runs over
// the chunk: per pair, two panel vectors against one broadcast x pair per row; its float32 sums
// go to `out` at the chunk's end and come back at the next one (32 floats a row: two vectors).
#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "bf16_kernels.h"
#include "dq.h"
#include "panel.h"
#include "pool.h"

namespace pg_edge {

namespace {

constexpr int PANEL = 32;  // weight rows per panel: two 16-lane vectors
constexpr int TILE = 12;   // x rows per tile: 24 float32 accumulators of the 32 registers
constexpr int KC = 1024;   // k per chunk: a panel chunk of 64 KB, a tile's x chunk of 24 KB

#ifdef QMV_BF16
#define DOT_ATTR __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512bf16")))

// x float32 rows [lo, hi) of [M, K] rounded to bfloat16 into xb [M, Kp] (Kp: K rounded up to 16,
// zeros past K).
DOT_ATTR void round_rows(const float* x, int K, int Kp, uint16_t* xb, int lo, int hi) {
  for (int m = lo; m < hi; ++m) {
    const float* src = x + static_cast<size_t>(m) * K;
    uint16_t* dst = xb + static_cast<size_t>(m) * Kp;
    for (int k = 0; k < Kp; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(bf16::first(K - k), src + k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Weight row n, k [k0, k0 + kn), as bfloat16 into dst, zeros up to kn rounded up to 16; tmp: kn
// floats.
DOT_ATTR void fill_row(const bf16::Job& j, int n, int k0, int kn, uint16_t* dst, float* tmp) {
  const int knp = (kn + 15) / 16 * 16;
  if (j.w16 != nullptr && !j.fp16) {
    std::memcpy(dst, j.w16 + static_cast<size_t>(n) * j.K + k0, static_cast<size_t>(kn) * 2);
    std::fill(dst + kn, dst + knp, uint16_t{0});
    return;
  }
  if (j.w16 != nullptr) {  // float16 -> float32 (exact) -> bfloat16
    const uint16_t* src = j.w16 + static_cast<size_t>(n) * j.K + k0;
    for (int k = 0; k < knp; k += 16) {
      const __m512 f = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bf16::first(kn - k), src + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(f));
    }
    return;
  }
  dequantize_span(j.wq, j.scales, j.biases, j.sdt, j.K, j.gs, j.bits, n, k0, kn, tmp);
  for (int k = 0; k < kn; k += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tmp + k)));
  }
}

// x rows [m0, m0 + MT) (bfloat16, xb [M, Kp]) at k [k0, k0 + 2 * pairs) against one panel chunk
// (pa: rows 0-15, pb: rows 16-31, each [pairs][16] int32 pairs): out[m, n0 .. n0 + rows) +=
// (or =, when `first_chunk`) the sums.
template <int MT>
DOT_ATTR void tile(const bf16::Job& j, const uint16_t* xb, int Kp, int m0, int k0, int pairs, const int32_t* pa,
                   const int32_t* pb, int n0, int rows, bool first_chunk) {
  const __mmask16 ma = bf16::first(rows), mb = bf16::first(rows - 16);
  __m512 acc[MT][2];
  const int32_t* xr[MT];
  for (int t = 0; t < MT; ++t) {
    const float* o = j.out + static_cast<size_t>(m0 + t) * j.N + n0;
    acc[t][0] = first_chunk ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(ma, o);
    acc[t][1] = first_chunk ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mb, o + 16);
    xr[t] = reinterpret_cast<const int32_t*>(xb + static_cast<size_t>(m0 + t) * Kp + k0);
  }
  for (int p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(pa + p * 16);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(pb + p * 16);
    for (int t = 0; t < MT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xr[t][p]);
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, xv);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, xv);
    }
  }
  for (int t = 0; t < MT; ++t) {
    float* o = j.out + static_cast<size_t>(m0 + t) * j.N + n0;
    _mm512_mask_storeu_ps(o, ma, acc[t][0]);
    _mm512_mask_storeu_ps(o + 16, mb, acc[t][1]);
  }
}

using TileFn = void (*)(const bf16::Job&, const uint16_t*, int, int, int, int, const int32_t*, const int32_t*, int,
                        int, bool);

template <int... I>
constexpr auto tile_table(std::integer_sequence<int, I...>) {
  return std::array<TileFn, sizeof...(I)>{tile<I + 1>...};
}
// tiles[r - 1]: a tile of r rows (the last rows of x, M % TILE of them, in one tile)
constexpr auto tiles = tile_table(std::make_integer_sequence<int, TILE>{});

// Output rows [lo, hi) (weight rows), every x row.
DOT_ATTR void panels(const bf16::Job& j, const uint16_t* xb, int Kp, int lo, int hi) {
  std::vector<uint16_t> rowsbuf(static_cast<size_t>(PANEL) * KC, 0);
  std::vector<int32_t> panel(static_cast<size_t>(KC / 2) * PANEL);
  std::vector<float> tmp(KC);
  int32_t* pa = panel.data();
  int32_t* pb = pa + static_cast<size_t>(KC / 2) * 16;
  for (int n0 = lo; n0 < hi; n0 += PANEL) {
    const int rows = std::min(PANEL, hi - n0);
    for (int k0 = 0; k0 < j.K; k0 += KC) {
      const int kn = std::min(KC, j.K - k0), pairs = (kn + 15) / 16 * 8;
      for (int r = 0; r < rows; ++r) {
        fill_row(j, n0 + r, k0, kn, rowsbuf.data() + static_cast<size_t>(r) * KC, tmp.data());
      }
      // rows past `rows` keep what they held: their lanes are never stored
      transpose_panel(reinterpret_cast<const int32_t*>(rowsbuf.data()), KC / 2, pairs, pa);
      if (rows > 16) transpose_panel(reinterpret_cast<const int32_t*>(rowsbuf.data() + 16 * KC), KC / 2, pairs, pb);
      int m = 0;
      for (; m + TILE <= j.M; m += TILE) tile<TILE>(j, xb, Kp, m, k0, pairs, pa, pb, n0, rows, k0 == 0);
      if (m < j.M) tiles[j.M - m - 1](j, xb, Kp, m, k0, pairs, pa, pb, n0, rows, k0 == 0);
    }
  }
}
#endif  // QMV_BF16

}  // namespace

bool bf16dot_available() {
#ifdef QMV_BF16
  static const bool ok = [] {
    if (env_is("PG_EDGE_PREFILL", {"float32", "off", "0", "int8", "int16"})) return false;
    if (cpu_simd() < 2) return false;  // no AVX-512 (or PG_EDGE_QMV_SIMD caps it below)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool bf16dot_applies(int K, bool affine, int gs, int bits) {
  if (!bf16dot_available()) return false;
  return !affine || ((bits == 4 || bits == 8) && K % gs == 0 && gs % 16 == 0);
}

namespace bf16 {

bool dot_run([[maybe_unused]] const Job& j, [[maybe_unused]] const float* x) {
#ifdef QMV_BF16
  if (!bf16dot_applies(j.K, j.w16 == nullptr, j.gs, j.bits)) return false;
  const int Kp = (j.K + 15) / 16 * 16;
  std::vector<uint16_t> xb(static_cast<size_t>(j.M) * Kp);
  split_rows(j.M, static_cast<int64_t>(j.M) * j.K * 16, 1,
             [&](int lo, int hi) { round_rows(x, j.K, Kp, xb.data(), lo, hi); });
  split_rows(j.N, static_cast<int64_t>(j.N) * j.K * j.M, PANEL,
             [&](int lo, int hi) { panels(j, xb.data(), Kp, lo, hi); });
  return true;
#endif
  return false;
}

}  // namespace bf16

}  // namespace pg_edge
