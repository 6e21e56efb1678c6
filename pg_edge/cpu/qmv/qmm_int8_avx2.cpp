// pg_edge's many-row (prefill) product of large 4-bit weights with x rounded to int8, on AVX2
// (CPUs without AVX512-VNNI: Intel since Haswell, AMD Zen 1-3): the rounding and the maths of
// qmv_int8.cpp (x rounded per row and group, centred nibbles, the biases' term from float32 sums
// of x), in a GEMM layout like qmm_int8.cpp's.
//
// Layout: each thread takes its weight rows PANEL at a time and unpacks them once into bytes, k
// in quads: panel[q][r] = the 4 weights of row r at k = 4q .. 4q + 3, one int32 lane per row.
// A tile of MT x rows runs over the panel: per quad and x row, VPMADDUBSW multiplies the panel
// vector (unsigned nibbles, 0..15) by the broadcast x quad (signed, -127..127) into int16 pair
// sums of at most 2 * 15 * 127 = 3810 in size, so eight quads add up in int16 (30480 < 32767)
// before one VPMADDWD by ones widens them into the int32 sums: two instructions per 32 products
// where the decode kernel's VPMADDUBSW + VPMADDWD + VPADDD take three (docs/performance.md,
// "Prefill on AVX2 CPUs: int8 and int16; int16 on AVX512-VNNI"). At each group's end the int32 sums become float32,
// times scale[n, g] * sx[m, g], plus the centring's and the biases' terms.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common.h"
#include "panel.h"
#include "pool.h"
#include "qmv_int8.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

namespace {

constexpr int NV = 2;         // 8-lane vectors per panel
constexpr int PANEL = 8 * NV;  // weight rows per panel
static_assert(PANEL == 16, "transpose_panel (panel.h) fills 16 lanes");
constexpr int TILE = 3;        // x rows per tile: 6 int16 + 6 int32 accumulators, 15 of the 16 registers
constexpr int RUN = 8;         // quads summed in int16 before widening (the bound above)

#ifdef QMV_X86
#define QMM2_ATTR __attribute__((target("avx2,fma")))

QMM2_ATTR inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1)));
}

QMM2_ATTR inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

QMM2_ATTR inline int hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// x rows [lo, hi) rounded into r (sized by the caller); false when a group's largest |x| or its
// sum is not finite. VCVTPS2DQ rounds to nearest even, as the decode kernel's std::nearbyint does.
QMM2_ATTR bool round_rows(const Int8Product& p, Int8Rows& r, int lo, int hi) {
  const int G = p.K / p.gs;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int m = lo; m < hi; ++m) {
    for (int g = 0; g < G; ++g) {
      const float* x = p.x + static_cast<size_t>(m) * p.K + g * p.gs;
      __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      for (int k = 0; k < p.gs; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
        vsum = _mm256_add_ps(vsum, v);
      }
      const float amax = hmax8(vmax), sum = hsum8(vsum);
      // NaN: max_ps keeps its second operand, so a NaN lane can be dropped from amax; the sum keeps it
      if (!std::isfinite(amax) || !std::isfinite(sum)) return false;
      const float inv = amax > 0.f ? 127.f / amax : 0.f, step = amax / 127.f;
      int8_t* q = r.xq.data() + static_cast<size_t>(m) * p.K + g * p.gs;
      __m256i vq = _mm256_setzero_si256();
      for (int k = 0; k < p.gs; k += 8) {
        __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_set1_ps(inv)));
        iv = _mm256_max_epi32(_mm256_min_epi32(iv, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
        vq = _mm256_add_epi32(vq, iv);
        const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(iv), _mm256_extracti128_si256(iv, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w16, w16));
      }
      const size_t i = static_cast<size_t>(m) * G + g;
      r.sx[i] = step;
      r.xsum[i] = sum;
      r.xr[i] = 8.f * (r.xsum[i] - step * static_cast<float>(hsum8i(vq)));
    }
  }
  return true;
}

// Rows [n0, n0 + rows) of the weight into `panel` ([K / 4][PANEL] int32 quads, rows past `rows`
// zero) and their scales / biases into sct / bit ([G][PANEL] float32); `bytes`: PANEL * K scratch.
QMM2_ATTR void fill_panel(const Int8Product& p, int n0, int rows, uint8_t* bytes, int32_t* panel, float* sct,
                          float* bit, float* tmp) {
  unpack_int4_rows(p, n0, rows, PANEL, bytes, sct, bit, tmp);
  // row r's quad q to lane r of line q
  transpose_panel(reinterpret_cast<const int32_t*>(bytes), p.K / 4, p.K / 4, panel);
}

// x rows [m0, m0 + MT) against one panel: out[m, n0 + r] for r < rows.
template <int MT>
QMM2_ATTR void tile(const Int8Product& p, const Int8Rows& x, int m0, int n0, int rows, const int32_t* panel,
                    const float* sct, const float* bit, float* out) {
  const int G = p.K / p.gs, qpg = p.gs / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float f[MT][PANEL] = {};
  for (int g = 0; g < G; ++g) {
    __m256i acc[MT][NV];
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_si256();
    for (int q0 = 0; q0 < qpg; q0 += RUN) {  // gs >= 32: whole runs of 8 quads
      __m256i a16[MT][NV];
      for (int t = 0; t < MT; ++t)
        for (int v = 0; v < NV; ++v) a16[t][v] = _mm256_setzero_si256();
      for (int q = q0; q < q0 + RUN; ++q) {
        const int32_t* line = panel + static_cast<size_t>(g * qpg + q) * PANEL;
        __m256i w[NV];
        for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 8 * v));
        for (int t = 0; t < MT; ++t) {
          int32_t quad;
          __builtin_memcpy(&quad, x.xq.data() + static_cast<size_t>(m0 + t) * p.K + (g * qpg + q) * 4, 4);
          const __m256i xb = _mm256_set1_epi32(quad);
          for (int v = 0; v < NV; ++v) a16[t][v] = _mm256_add_epi16(a16[t][v], _mm256_maddubs_epi16(w[v], xb));
        }
      }
      for (int t = 0; t < MT; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_add_epi32(acc[t][v], _mm256_madd_epi16(a16[t][v], ones));
    }
    for (int v = 0; v < NV; ++v) {
      const __m256 s = _mm256_loadu_ps(sct + g * PANEL + 8 * v), b = _mm256_loadu_ps(bit + g * PANEL + 8 * v);
      for (int t = 0; t < MT; ++t) {
        const size_t i = static_cast<size_t>(m0 + t) * G + g;
        __m256 y = _mm256_load_ps(f[t] + 8 * v);
        y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][v]), _mm256_mul_ps(s, _mm256_set1_ps(x.sx[i])), y);
        // the biases' and the centring's terms (qmv_int8.cpp)
        y = _mm256_fmadd_ps(b, _mm256_set1_ps(x.xsum[i]), _mm256_fmadd_ps(s, _mm256_set1_ps(x.xr[i]), y));
        _mm256_store_ps(f[t] + 8 * v, y);
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    std::copy(f[t], f[t] + rows, out + static_cast<size_t>(m0 + t) * p.N + n0);
}

// Output rows [lo, hi) (weight rows), every x row.
QMM2_ATTR void panels(const Int8Product& p, const Int8Rows& x, int lo, int hi, float* out) {
  const int G = p.K / p.gs;
  std::vector<uint8_t> bytes(static_cast<size_t>(PANEL) * p.K);
  std::vector<int32_t> panel(static_cast<size_t>(p.K / 4) * PANEL);
  LineScratch scales(static_cast<size_t>(2 * G * PANEL + G));
  float* sct = scales.data();
  float* bit = sct + G * PANEL;
  float* tmp = bit + G * PANEL;
  for (int n0 = lo; n0 < hi; n0 += PANEL) {
    const int rows = std::min(PANEL, hi - n0);
    fill_panel(p, n0, rows, bytes.data(), panel.data(), sct, bit, tmp);
    int m = 0;
    for (; m + TILE <= p.M; m += TILE) tile<TILE>(p, x, m, n0, rows, panel.data(), sct, bit, out);
    for (; m < p.M; ++m) tile<1>(p, x, m, n0, rows, panel.data(), sct, bit, out);
  }
}
#endif

}  // namespace

#ifdef QMV_X86
// Rows [n0, n0 + rows) of p's 4-bit weight unpacked to one byte a weight ([lanes][K], in order;
// rows past `rows` zero) and their scales / biases to sct / bit ([G][lanes] float32). K % 64 == 0.
__attribute__((target("avx2"))) void unpack_int4_rows(const Int8Product& p, int n0, int rows, int lanes,
                                                     uint8_t* bytes, float* sct, float* bit, float* tmp) {
  const int G = p.K / p.gs, half = p.K / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < lanes; ++r) {
    uint8_t* dst = bytes + static_cast<size_t>(r) * p.K;
    if (r >= rows) {
      std::fill(dst, dst + p.K, uint8_t{0});
      for (int g = 0; g < G; ++g) sct[g * lanes + r] = bit[g * lanes + r] = 0.f;
      continue;
    }
    const uint8_t* src = reinterpret_cast<const uint8_t*>(p.w) + static_cast<size_t>(n0 + r) * half;
    for (int b = 0; b < half; b += 32) {  // 32 bytes -> 64 weights in order (K % 64 == 0)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i ul = _mm256_unpacklo_epi8(lo, hi), uh = _mm256_unpackhi_epi8(lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * b), _mm256_permute2x128_si256(ul, uh, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * b + 32), _mm256_permute2x128_si256(ul, uh, 0x31));
    }
    load_floats(p.scales, p.sdt, static_cast<size_t>(n0 + r) * G, G, tmp);
    for (int g = 0; g < G; ++g) sct[g * lanes + r] = tmp[g];
    load_floats(p.biases, p.sdt, static_cast<size_t>(n0 + r) * G, G, tmp);
    for (int g = 0; g < G; ++g) bit[g * lanes + r] = tmp[g];
  }
}

#endif

bool round_int8_rows([[maybe_unused]] const Int8Product& p, [[maybe_unused]] Int8Rows& r) {
#ifdef QMV_X86
  const size_t groups = static_cast<size_t>(p.M) * (p.K / p.gs);
  r.xq.resize(static_cast<size_t>(p.M) * p.K);
  r.sx.resize(groups);
  r.xsum.resize(groups);
  r.xr.resize(groups);
  std::atomic<bool> finite{true};
  split_rows(p.M, static_cast<int64_t>(p.M) * p.K * 64, 1, [&](int lo, int hi) {
    if (!round_rows(p, r, lo, hi)) finite = false;
  });
  return finite;
#endif
  return false;
}

bool int8_matmul_avx2([[maybe_unused]] const Int8Product& p, [[maybe_unused]] float* out) {
#ifdef QMV_X86
  if (int8_level() < 1 || p.gs % (4 * RUN) != 0 || p.K % 64 != 0) return false;
  Int8Rows x;
  if (!round_int8_rows(p, x)) return false;
  split_rows(p.N, static_cast<int64_t>(p.N) * p.K * p.M, PANEL, [&](int lo, int hi) { panels(p, x, lo, hi, out); });
  return true;
#endif
  return false;  // not x86: int8_level() is 0 there, and qmv.cpp does not call this
}

}  // namespace pg_edge
