// pg_edge's many-row (prefill) product of large 4-bit weights with x rounded to int8, on
// AVX512-VNNI: the GEMM layout of qmv_int8.cpp's rounding (see qmv_int8.h, qmv_int8.cpp for the
// maths: x rounded per row and group, centred nibbles, the biases' term from float32 sums of x;
// the rounding itself: round_int8_rows, qmm_int8_avx2.cpp).
//
// Layout: each thread takes its weight rows 32 at a time (a panel) and unpacks them once into
// bytes, k in quads: panel[q][r] = the 4 weights of row r at k = 4q .. 4q + 3, one int32 lane per
// row. A tile of up to 6 x rows then runs over the panel: per quad, two panel vectors (32 rows)
// and one broadcast x quad per x row feed VPDPBUSD; at each group's end the int32 sums become
// float32, times scale[n, g] * sx[m, g]. No horizontal sums: lane r is output row r.
#include <algorithm>
#include <vector>

#include "common.h"
#include "pool.h"
#include "qmv_int8.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

namespace {

constexpr int PANEL = 32;  // weight rows per panel: two 16-lane vectors
constexpr int TILE = 6;    // x rows per tile: 12 int32 + 12 float32 accumulators

#ifdef QMV_X86
#define QMM_ATTR __attribute__((target("avx512f,avx512bw,avx512vnni")))

// Rows [n0, n0 + rows) of the weight into `panel` ([K / 4][PANEL] int32 quads, rows past `rows`
// zero) and their scales / biases into sct / bit ([G][PANEL] float32); `bytes`: PANEL * K scratch.
QMM_ATTR void fill_panel(const Int8Product& p, int n0, int rows, uint8_t* bytes, int32_t* panel, float* sct,
                         float* bit, float* tmp) {
  unpack_int4_rows(p, n0, rows, PANEL, bytes, sct, bit, tmp);  // qmm_int8_avx2.cpp
  alignas(64) int idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = i * p.K / 4;  // row i's quads, as int32 offsets
  const __m512i rows16 = _mm512_load_si512(idx);
  for (int q = 0; q < p.K / 4; ++q) {
    for (int h = 0; h < 2; ++h) {
      const int* base = reinterpret_cast<const int*>(bytes + static_cast<size_t>(h) * 16 * p.K) + q;
      _mm512_storeu_si512(panel + (static_cast<size_t>(q) * PANEL + 16 * h),
                          _mm512_i32gather_epi32(rows16, base, 4));
    }
  }
}

// x rows [m0, m0 + MT) against one panel: out[m, n0 + r] for r < rows.
template <int MT>
QMM_ATTR void tile(const Int8Product& p, const Int8Rows& x, int m0, int n0, int rows, const int32_t* panel,
                   const float* sct, const float* bit, float* out) {
  const int G = p.K / p.gs, qpg = p.gs / 4;
  __m512 f[MT][2];
  for (int t = 0; t < MT; ++t) f[t][0] = f[t][1] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m512i acc[MT][2];
    for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    const int32_t* pq = panel + static_cast<size_t>(g) * qpg * PANEL;
    for (int q = 0; q < qpg; ++q) {
      const __m512i w0 = _mm512_loadu_si512(pq + q * PANEL), w1 = _mm512_loadu_si512(pq + q * PANEL + 16);
      for (int t = 0; t < MT; ++t) {
        int32_t quad;
        __builtin_memcpy(&quad, x.xq.data() + static_cast<size_t>(m0 + t) * p.K + (g * qpg + q) * 4, 4);
        const __m512i xb = _mm512_set1_epi32(quad);
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], w0, xb);
        acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sct + g * PANEL), s1 = _mm512_loadu_ps(sct + g * PANEL + 16);
    const __m512 b0 = _mm512_loadu_ps(bit + g * PANEL), b1 = _mm512_loadu_ps(bit + g * PANEL + 16);
    for (int t = 0; t < MT; ++t) {
      const size_t i = static_cast<size_t>(m0 + t) * G + g;
      const __m512 sx = _mm512_set1_ps(x.sx[i]), xs = _mm512_set1_ps(x.xsum[i]), xr = _mm512_set1_ps(x.xr[i]);
      f[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][0]), _mm512_mul_ps(s0, sx), f[t][0]);
      f[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][1]), _mm512_mul_ps(s1, sx), f[t][1]);
      // the biases' and the centring's terms (qmv_int8.cpp)
      f[t][0] = _mm512_fmadd_ps(b0, xs, _mm512_fmadd_ps(s0, xr, f[t][0]));
      f[t][1] = _mm512_fmadd_ps(b1, xs, _mm512_fmadd_ps(s1, xr, f[t][1]));
    }
  }
  const __mmask16 k0 = rows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  const __mmask16 k1 = rows >= 32 ? 0xFFFF : (rows <= 16 ? 0 : static_cast<__mmask16>((1u << (rows - 16)) - 1));
  for (int t = 0; t < MT; ++t) {
    float* o = out + static_cast<size_t>(m0 + t) * p.N + n0;
    _mm512_mask_storeu_ps(o, k0, f[t][0]);
    _mm512_mask_storeu_ps(o + 16, k1, f[t][1]);
  }
}

// Output rows [lo, hi) (weight rows), every x row.
QMM_ATTR void panels(const Int8Product& p, const Int8Rows& x, int lo, int hi, float* out) {
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
    switch (p.M - m) {
      case 5: tile<5>(p, x, m, n0, rows, panel.data(), sct, bit, out); break;
      case 4: tile<4>(p, x, m, n0, rows, panel.data(), sct, bit, out); break;
      case 3: tile<3>(p, x, m, n0, rows, panel.data(), sct, bit, out); break;
      case 2: tile<2>(p, x, m, n0, rows, panel.data(), sct, bit, out); break;
      case 1: tile<1>(p, x, m, n0, rows, panel.data(), sct, bit, out); break;
      default: break;
    }
  }
}
#endif

}  // namespace

bool int8_matmul([[maybe_unused]] const Int8Product& p, [[maybe_unused]] float* out) {
#ifdef QMV_X86
  if (int8_level() != 2) return false;
  Int8Rows x;
  if (!round_int8_rows(p, x)) return false;  // qmm_int8_avx2.cpp
  split_rows(p.N, static_cast<int64_t>(p.N) * p.K * p.M, PANEL, [&](int lo, int hi) { panels(p, x, lo, hi, out); });
  return true;
#endif
  return false;  // not x86: int8_level() is 0 there, and qmv.cpp does not call this
}

}  // namespace pg_edge
