// pg_edge's many-row (prefill) products of bfloat16 / float16 and 8-bit weights on CPUs without
// AMX, in int16 with int32 sums: the kernel of bf16_gemm.cpp's primitives there (see
// bf16_gemm.h). Level 1, AVX2 (Intel since Haswell, AMD Zen 1-3): VPMADDWD + VPADDD; level 2,
// AVX512-VNNI (Intel Ice Lake / Cascade Lake): VPDPWSSD on the same 256-bit vectors. (AMD Zen 4/5
// have AVX512-BF16 and run qmm_bf16dot.cpp for these weights instead.)
//
// out[m, n] = sum_b s_w[n, b] * sx[m, b] * (wq[n, b] . xq[m, b])  (+ bias[n, b] * sum(x[m, b]))
//
// Why: these CPUs multiply 16 int16 pairs in one VPMADDWD where an FMA does 8 float32 products,
// and prefill is bound by those products (docs/performance.md, "Prefill on AVX2 CPUs: int8 and
// int16; int16 on AVX512-VNNI").
// Blocks b of k: a quantized weight's own groups (gs), else 64 (the last one shorter when 64 does
// not divide K; K a multiple of 16).
//   8-bit affine weights: wq = the stored bytes q (exact), s_w = scale, plus the biases' term
//     from float32 sums of x; x rounded to +-32767 per block (gs * 255 * 32767 < 2^31).
//   bfloat16 / float16 weights: rounded per row and block to +-8191 (s_w = max|w_b| / 8191, a
//     step 16 times finer than bfloat16's own rounding of the block's largest weight), x to
//     +-4095 (64 * 8191 * 4095 < 2^31: no int32 sum overflows).
// So x loses far less than in the AMX kernel, which rounds it to bfloat16 (8 bits).
//
// Layout: each thread takes its weight rows 16 at a time (a panel) as int16, k in pairs:
// panel[p][r] = the weights of row r at k = 2p, 2p + 1 in one int32 lane. A tile of 6 x rows
// runs over it: per pair, two panel vectors and one broadcast x pair per x row feed VPMADDWD
// (or VPDPWSSD);
// at each block's end the int32 sums become float32, times s_w * sx.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "bf16_gemm.h"
#include "bf16_kernels.h"
#include "common.h"
#include "panel.h"
#include "pool.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

namespace {

constexpr int PANEL = 16;  // weight rows per panel: two 8-lane vectors
static_assert(PANEL == 16, "transpose_panel (panel.h) fills 16 lanes");
constexpr int TILE = 6;    // x rows per tile: 12 int32 accumulators, 15 of the 16 registers
constexpr int FLOAT_BLOCK = 64;
constexpr float W_MAX = 8191.f, X_MAX_FLOAT = 4095.f, X_MAX_AFFINE = 32767.f;

struct Rounded {
  int B;                     // k per block
  std::vector<int16_t> xq;   // [M, K]
  std::vector<float> sx;     // [M, K / B]: the step of each block
  std::vector<float> xsum;   // [M, K / B]: float32 sums (affine weights' biases)
};

#ifdef QMV_X86
#define Q16_ATTR __attribute__((target("avx2,fma,f16c")))

// Rows [lo, hi) of x rounded into r, steps max|x_b| / xmax; false when one is not finite.
Q16_ATTR bool round_rows(const float* x, int K, float xmax, Rounded& r, int lo, int hi) {
  const int B = r.B, G = (K + B - 1) / B;
  for (int m = lo; m < hi; ++m) {
    for (int g = 0; g < G; ++g) {
      const float* xb = x + static_cast<size_t>(m) * K + g * B;
      const int len = std::min(B, K - g * B);
      float amax = 0.f, sum = 0.f;
      for (int k = 0; k < len; ++k) {
        amax = std::max(amax, std::fabs(xb[k]));
        sum += xb[k];
      }
      if (!std::isfinite(amax)) return false;
      const float inv = amax > 0.f ? xmax / amax : 0.f;
      int16_t* q = r.xq.data() + static_cast<size_t>(m) * K + g * B;
      for (int k = 0; k < len; k += 8) {
        const __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), _mm256_set1_ps(inv)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                         _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1)));
      }
      r.sx[static_cast<size_t>(m) * G + g] = amax / xmax;
      r.xsum[static_cast<size_t>(m) * G + g] = sum;
    }
  }
  return true;
}

// Weight row n as int16 into dst [K], its block steps into sw[b * PANEL] and (affine) biases into
// bw[b * PANEL]; tmp: K floats.
Q16_ATTR void fill_row(const bf16::Job& j, int B, int n, int16_t* dst, float* sw, float* bw, float* tmp) {
  const int G = (j.K + B - 1) / B;
  if (j.w16 == nullptr) {  // 8-bit affine: the bytes as they are
    const uint8_t* src = j.wq + static_cast<size_t>(n) * j.K;
    for (int k = 0; k < j.K; k += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    }
    load_floats(j.scales, j.sdt, static_cast<size_t>(n) * G, G, tmp);
    for (int g = 0; g < G; ++g) sw[g * PANEL] = tmp[g];
    load_floats(j.biases, j.sdt, static_cast<size_t>(n) * G, G, tmp);
    for (int g = 0; g < G; ++g) bw[g * PANEL] = tmp[g];
    return;
  }
  // Per block: the largest |w| from the 16-bit patterns themselves (sign cleared, a non-negative
  // bfloat16 or float16 orders as its bits do), then each weight converted, scaled and rounded.
  const uint16_t* src = j.w16 + static_cast<size_t>(n) * j.K;
  const __m256i magnitude = _mm256_set1_epi16(0x7FFF);
  for (int g = 0; g < G; ++g) {
    const uint16_t* w = src + g * B;
    const int len = std::min(B, j.K - g * B);
    __m256i vmax = _mm256_setzero_si256();
    for (int k = 0; k < len; k += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      vmax = _mm256_max_epu16(vmax, _mm256_and_si256(v, magnitude));
    }
    alignas(32) uint16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
    const uint16_t top = *std::max_element(lanes, lanes + 16);
    const float amax = j.fp16 ? _cvtsh_ss(top) : [top] {
      const uint32_t bits = static_cast<uint32_t>(top) << 16;
      float f;
      __builtin_memcpy(&f, &bits, 4);
      return f;
    }();  // finite: weights as loaded
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? W_MAX / amax : 0.f);
    for (int k = 0; k < len; k += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      const __m256 f = j.fp16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      const __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(f, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + g * B + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1)));
    }
    sw[g * PANEL] = amax / W_MAX;
    bw[g * PANEL] = 0.f;
  }
}

// x rows [m0, m0 + MT) against one panel ([K / 2][PANEL] int32 pairs; sw / bw [G][PANEL]):
// out[m, n0 + r] for r < rows. DOT(acc, w, xb) adds the pair products of w and xb to acc: on
// AVX2 VPMADDWD + VPADDD, on AVX512-VNNI one VPDPWSSD (the same int32 sums).
#define Q16_TILE(NAME, ATTR, DOT)                                                                                 \
  template <int MT>                                                                                              \
  ATTR void NAME(const bf16::Job& j, const Rounded& x, int m0, int n0, int rows, const int32_t* panel,          \
                 const float* sw, const float* bw, bool affine) {                                                \
    const int B = x.B, G = (j.K + B - 1) / B;                                                                    \
    alignas(32) float f[MT][PANEL] = {};                                                                         \
    for (int g = 0; g < G; ++g) {                                                                                \
      __m256i acc[MT][2];                                                                                        \
      for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();                               \
      const int ppb = std::min(B, j.K - g * B) / 2;                                                              \
      const int32_t* pp = panel + static_cast<size_t>(g) * (B / 2) * PANEL;                                      \
      for (int p = 0; p < ppb; ++p) {                                                                            \
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pp + p * PANEL));                \
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pp + p * PANEL + 8));            \
        for (int t = 0; t < MT; ++t) {                                                                           \
          int32_t pair;                                                                                          \
          __builtin_memcpy(&pair, x.xq.data() + static_cast<size_t>(m0 + t) * j.K + g * B + 2 * p, 4);           \
          const __m256i xb = _mm256_set1_epi32(pair);                                                            \
          acc[t][0] = DOT(acc[t][0], w0, xb);                                                                    \
          acc[t][1] = DOT(acc[t][1], w1, xb);                                                                    \
        }                                                                                                        \
      }                                                                                                          \
      for (int v = 0; v < 2; ++v) {                                                                              \
        const __m256 s = _mm256_loadu_ps(sw + g * PANEL + 8 * v), b = _mm256_loadu_ps(bw + g * PANEL + 8 * v);   \
        for (int t = 0; t < MT; ++t) {                                                                           \
          const size_t i = static_cast<size_t>(m0 + t) * G + g;                                                  \
          __m256 y = _mm256_load_ps(f[t] + 8 * v);                                                               \
          y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][v]), _mm256_mul_ps(s, _mm256_set1_ps(x.sx[i])), y);      \
          if (affine) y = _mm256_fmadd_ps(b, _mm256_set1_ps(x.xsum[i]), y);                                      \
          _mm256_store_ps(f[t] + 8 * v, y);                                                                      \
        }                                                                                                        \
      }                                                                                                          \
    }                                                                                                            \
    for (int t = 0; t < MT; ++t) std::copy(f[t], f[t] + rows, j.out + static_cast<size_t>(m0 + t) * j.N + n0);   \
  }

#define Q16_VNNI_ATTR __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define Q16_DOT_AVX2(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#define Q16_DOT_VNNI(acc, w, x) _mm256_dpwssd_epi32(acc, w, x)
Q16_TILE(tile_avx2, Q16_ATTR, Q16_DOT_AVX2)
Q16_TILE(tile_vnni, Q16_VNNI_ATTR, Q16_DOT_VNNI)

// Output rows [lo, hi) (weight rows), every x row.
Q16_ATTR void panels(const bf16::Job& j, const Rounded& x, int lo, int hi, bool vnni) {
  const int B = x.B, G = (j.K + B - 1) / B;
  const bool affine = j.w16 == nullptr;
  std::vector<int16_t> rowsbuf(static_cast<size_t>(PANEL) * j.K);
  std::vector<int32_t> panel(static_cast<size_t>(j.K / 2) * PANEL);
  std::vector<float> tmp(j.K);
  LineScratch scales(static_cast<size_t>(2 * G * PANEL));
  float* sw = scales.data();
  float* bw = sw + G * PANEL;
  for (int n0 = lo; n0 < hi; n0 += PANEL) {
    const int rows = std::min(PANEL, hi - n0);
    for (int r = 0; r < PANEL; ++r) {
      int16_t* dst = rowsbuf.data() + static_cast<size_t>(r) * j.K;
      if (r < rows) {
        fill_row(j, B, n0 + r, dst, sw + r, bw + r, tmp.data());
      } else {
        std::fill(dst, dst + j.K, int16_t{0});
        for (int g = 0; g < G; ++g) sw[g * PANEL + r] = bw[g * PANEL + r] = 0.f;
      }
    }
    // row r's pair p to lane r of line p
    transpose_panel(reinterpret_cast<const int32_t*>(rowsbuf.data()), j.K / 2, j.K / 2, panel.data());
    int m = 0;
    if (vnni) {
      for (; m + TILE <= j.M; m += TILE) tile_vnni<TILE>(j, x, m, n0, rows, panel.data(), sw, bw, affine);
      for (; m < j.M; ++m) tile_vnni<1>(j, x, m, n0, rows, panel.data(), sw, bw, affine);
    } else {
      for (; m + TILE <= j.M; m += TILE) tile_avx2<TILE>(j, x, m, n0, rows, panel.data(), sw, bw, affine);
      for (; m < j.M; ++m) tile_avx2<1>(j, x, m, n0, rows, panel.data(), sw, bw, affine);
    }
  }
}
#endif

}  // namespace

int int16_level() {
#ifdef QMV_X86
  static const int level = [] {
    if (env_is("PG_EDGE_PREFILL", {"float32", "off", "0"})) return 0;
    if (cpu_simd() < 1 || !cpu_f16c()) return 0;
    __builtin_cpu_init();
    return cpu_simd() >= 2 && __builtin_cpu_supports("avx512vnni") ? 2 : 1;
  }();
  return level;
#else
  return 0;
#endif
}

bool int16_available() {
  return int16_level() > 0;
}

const char* int16_kernel() {
  static const char* names[] = {"none", "int16 on AVX2", "int16 on AVX512-VNNI"};
  return names[int16_level()];
}

bool int16_applies(int K, bool affine, int gs, int bits) {
  if (!int16_available()) return false;
  if (affine) return bits == 8 && K % gs == 0 && gs % 16 == 0;
  return K % 16 == 0;
}

namespace bf16 {

bool int16_run([[maybe_unused]] const Job& j, [[maybe_unused]] const float* x) {
#ifdef QMV_X86
  const bool affine = j.w16 == nullptr;
  if (!int16_applies(j.K, affine, j.gs, j.bits)) return false;
  Rounded r;
  r.B = affine ? j.gs : FLOAT_BLOCK;
  const size_t groups = static_cast<size_t>(j.M) * ((j.K + r.B - 1) / r.B);
  r.xq.resize(static_cast<size_t>(j.M) * j.K);
  r.sx.resize(groups);
  r.xsum.resize(groups);
  std::atomic<bool> finite{true};
  const float xmax = affine ? X_MAX_AFFINE : X_MAX_FLOAT;
  split_rows(j.M, static_cast<int64_t>(j.M) * j.K * 64, 1, [&](int lo, int hi) {
    if (!round_rows(x, j.K, xmax, r, lo, hi)) finite = false;
  });
  if (!finite) return false;
  split_rows(j.N, static_cast<int64_t>(j.N) * j.K * j.M, PANEL, [&](int lo, int hi) { panels(j, r, lo, hi, int16_level() == 2); });
  return true;
#endif
  return false;
}

}  // namespace bf16

}  // namespace pg_edge
