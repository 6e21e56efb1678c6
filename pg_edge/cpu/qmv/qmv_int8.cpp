// pg_edge's decode product of large 4-bit weights with x rounded to int8 (see qmv_int8.h).
//
// y[m, n] = sum_g scale[n, g] * (q_g . x_g) + bias[n, g] * sum(x_g),  g = k / gs
//
// The float32 kernels (qmv.cpp) spend most of their time turning each 4-bit weight into a float
// (a shift and a lookup per 16 weights) and stay compute-bound at about a third of the memory
// bandwidth (docs/performance.md, "Decode with int8 activations"). Here x is rounded to int8, per
// row and group of gs, with its own scale sx[m, g] = max|x_g| / 127, and q_g . x_g is summed in
// int32 by VPDPBUSD (64 unsigned weight bytes times 64 signed x bytes, four products per int32
// lane), so 128 weights cost an and, a shift, an and and two dot instructions:
//   q_g . x_g ~= sx[m, g] * (q_g . round(x_g / sx[m, g]))
// The weights enter centred, q - 8:
//   scale * (q . x) + bias * sum(x) = scale * ((q - 8) . x) + (bias + 8 * scale) * sum(x)
// where (q - 8) . round(x) = q . round(x) - 8 * sum(round(x)), the last sum taken once per x. The
// second term uses the float32 sums of x, so only the rounding of x enters, at most sx / 2 per
// element (about 1/250 of the group's largest x), times a centred weight, about as large as the
// weight itself: far below a 4-bit weight's own rounding (tests/cpu/test_qmv_int8.py measures
// it against the float32 kernel; docs/performance.md has the figures). 8-bit weights keep the
// float32 kernels: there the rounding of x would be as large as the weights' own.
//
// Layout: a block is 64 bytes of one weight row (128 elements), 16 int32 lanes. Byte t of block
// b holds elements b * 128 + 2t (low nibble) and + 1 (high nibble), so lane i sums elements
// b * 128 + 8i .. + 7, and x is stored per block as the 64 even elements then the 64 odd ones.
#include "qmv_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "pool.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

using namespace mlx::core;

namespace {

// x of one call, rounded: xq [M, K] int8 in the blocks' order, xl [M, blocks * 16] the scale
// sx of each lane's group, xc [M, blocks * 16] c times the sum of each lane's xq, xsum
// [M, K / gs] the float32 sums of x per group.
constexpr int B = 128;  // elements per 64-byte block
constexpr int E = B / 16;  // elements per int32 lane
// Bytes ahead of the block being read that the weight stream is prefetched from (6 KB: 5 rows
// of K = 2304). The hardware prefetchers stop at 4 KB pages; with this the LM head's product
// read 23 GB/s from memory instead of 15.5 (2 threads; docs/performance.md).
constexpr int kPrefetchBytes = 6144;

struct Job {
  Int8Product p;
  std::vector<int8_t> xq;
  std::vector<int32_t> xc;
  std::vector<float> xl, xsum;
};

// Rounds x into j's buffers; false when a group's largest |x| is not finite.
bool prepare(Job& j) {
  const Int8Product& p = j.p;
  const int groups = p.K / p.gs, blocks = p.K / B;
  j.xq.resize(static_cast<size_t>(p.M) * p.K);
  j.xl.resize(static_cast<size_t>(p.M) * blocks * 16);
  j.xc.assign(static_cast<size_t>(p.M) * blocks * 16, 0);
  j.xsum.resize(static_cast<size_t>(p.M) * groups);
  std::vector<float> sx(groups);
  for (int m = 0; m < p.M; ++m) {
    const float* x = p.x + static_cast<size_t>(m) * p.K;
    int8_t* xq = j.xq.data() + static_cast<size_t>(m) * p.K;
    for (int g = 0; g < groups; ++g) {
      float amax = 0.f, sum = 0.f;
      for (int k = g * p.gs; k < (g + 1) * p.gs; ++k) {
        amax = std::max(amax, std::fabs(x[k]));
        sum += x[k];
      }
      if (!std::isfinite(amax)) return false;
      sx[g] = amax / 127.f;
      j.xsum[static_cast<size_t>(m) * groups + g] = sum;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int k = g * p.gs; k < (g + 1) * p.gs; ++k) {
        const float r = std::nearbyint(x[k] * inv);
        const int8_t v = static_cast<int8_t>(std::clamp(r, -127.f, 127.f));
        const int b = k / B, r_in = k % B;
        j.xc[(static_cast<size_t>(m) * blocks + b) * 16 + r_in / E] += 8 * v;
        xq[b * B + (r_in & 1) * 64 + r_in / 2] = v;  // even elements, then odd: the nibbles' order
      }
    }
    float* xl = j.xl.data() + static_cast<size_t>(m) * blocks * 16;
    for (int b = 0; b < blocks; ++b) {
      for (int i = 0; i < 16; ++i) xl[b * 16 + i] = sx[(b * B + i * E) / p.gs];
    }
  }
  return true;
}

#ifdef QMV_X86
// Output rows [lo, hi) for the MB x rows from m0.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni(
    const Job& j, int lo, int hi, int m0, float* out) {
  const Int8Product& p = j.p;
  const int words = p.K / 8, groups = p.K / p.gs, blocks = p.K / B;
  const int gshift = __builtin_ctz(p.gs);  // group sizes are powers of two
  alignas(64) int idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = i * E / p.gs;
  const __m512i lane_group = _mm512_load_si512(idx);
  const int per_block = B > p.gs ? B / p.gs : 1;  // groups in a block (1, 2 or 4)
  const __mmask16 load_mask = static_cast<__mmask16>((1u << per_block) - 1);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  LineScratch scratch(2 * groups);  // this row's scales and biases (common.h: why its own lines)
  float* sc = scratch.data();
  float* bi = sc + groups;
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = p.w + static_cast<size_t>(n) * words;
    const size_t s0 = static_cast<size_t>(n) * groups;
    load_floats(p.scales, p.sdt, s0, groups, sc);
    load_floats(p.biases, p.sdt, s0, groups, bi);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(wr + b * 16);
      const __m512i qlo = _mm512_and_si512(wv, low4);
      const __m512i qhi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
      const int g0 = (b * B) >> gshift;
      const __m512 sv = per_block == 1
          ? _mm512_set1_ps(sc[g0])
          : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(load_mask, sc + g0));
      for (int m = 0; m < MB; ++m) {
        const size_t row = static_cast<size_t>(m0 + m);
        const int8_t* xb = j.xq.data() + row * p.K + static_cast<size_t>(b) * B;
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qlo, _mm512_loadu_si512(xb));
        d = _mm512_dpbusd_epi32(d, qhi, _mm512_loadu_si512(xb + 64));
        d = _mm512_sub_epi32(d, _mm512_loadu_si512(j.xc.data() + (row * blocks + b) * 16));
        const __m512 xs = _mm512_loadu_ps(j.xl.data() + (row * blocks + b) * 16);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, xs), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const size_t row = static_cast<size_t>(m0 + m);
      // the term sum_g (bias[g] + 8 scale[g]) * sum(x_g), in the same vector before the reduction
      const float* xsum = j.xsum.data() + row * groups;
      const __m512 eight = _mm512_set1_ps(8.f);
      for (int g = 0; g < groups; g += 16) {
        const __mmask16 k = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
        const __m512 centred = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sc + g), eight, _mm512_maskz_loadu_ps(k, bi + g));
        acc[m] = _mm512_fmadd_ps(centred, _mm512_maskz_loadu_ps(k, xsum + g), acc[m]);
      }
      out[row * p.N + n] = _mm512_reduce_add_ps(acc[m]);
    }
  }
}

void rows_all(const Job& j, int lo, int hi, float* out) {
  int m = 0;
  for (; m + 4 <= j.p.M; m += 4) rows_vnni<4>(j, lo, hi, m, out);
  switch (j.p.M - m) {
    case 3: rows_vnni<3>(j, lo, hi, m, out); break;
    case 2: rows_vnni<2>(j, lo, hi, m, out); break;
    case 1: rows_vnni<1>(j, lo, hi, m, out); break;
    default: break;
  }
}
#endif

}  // namespace

bool int8_available() {
#ifdef QMV_X86
  static const bool available = [] {
    if (const char* env = std::getenv("PG_EDGE_DECODE")) {
      const std::string v(env);
      if (v == "float32" || v == "off" || v == "0") return false;
    }
    __builtin_cpu_init();
    return cpu_simd() >= 2 && __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return available;
#else
  return false;
#endif
}

const char* decode_kernel() {
  return int8_available() ? "int8 on AVX512-VNNI" : "float32";
}

bool int8_applies(const Int8Product& p) {
  if (!int8_available() || p.bits != 4) return false;
  return static_cast<int64_t>(p.N) * p.K >= kInt8MinElements && p.K % B == 0;
}

bool int8_matvec(const Int8Product& p, float* out) {
#ifdef QMV_X86
  Job j{p, {}, {}, {}, {}};
  if (!prepare(j)) return false;
  split_rows(p.N, static_cast<int64_t>(p.N) * p.K * p.M, 1, [&](int lo, int hi) {
    rows_all(j, lo, hi, out);
  });
  return true;
#else
  (void)p;
  (void)out;
  return false;
#endif
}

}  // namespace pg_edge
