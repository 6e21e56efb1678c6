// pg_edge's decode product of large 4-bit weights with x rounded to int8 (see qmv_int8.h).
//
// y[m, n] = sum_g scale[n, g] * (q_g . x_g) + bias[n, g] * sum(x_g),  g = k / gs
//
// The float32 kernels (qmv.cpp) spend most of their time turning each 4-bit weight into a float
// (a shift and a lookup per 16 weights) and stay compute-bound at about a third of the memory
// bandwidth (docs/performance.md, "Decode with int8 activations"). Here x is rounded to int8, per
// row and group of gs, with its own scale sx[m, g] = max|x_g| / 127, and q_g . x_g is summed in
// int32: on AVX512-VNNI by VPDPBUSD (64 unsigned weight bytes times 64 signed x bytes, four
// products per int32 lane), so 128 weights cost an and, a shift, an and and two dot
// instructions; on AVX2 by VPMADDUBSW + VPMADDWD over 64 weights.
//   q_g . x_g ~= sx[m, g] * (q_g . round(x_g / sx[m, g]))
// The weights enter centred, q - 8:
//   scale * (q . x) + bias * sum(x) = scale * ((q - 8) . x) + (bias + 8 * scale) * sum(x)
// with (q - 8) . x ~= sx * (q . round(x)) - 8 * sx * sum(round(x)): the blocks sum the first
// part, each row's tail adds scale[g] * 8 * (sum(x_g) - sx[m, g] * sum(round(x_g))) (xr, taken
// once per call) with the biases' term. That term uses the float32 sums of x, so only the
// rounding of x enters, at most sx / 2 per element (about 1/250 of the group's largest x), times
// a centred weight, about as large as the weight itself: far below a 4-bit weight's own
// rounding (tests/cpu/test_qmv_int8.py measures it against the exact product;
// docs/performance.md has the figures). 8-bit weights keep the float32 kernels: there the
// rounding of x would be as large as the weights' own.
//
// Layout: a block is 64 bytes (AVX-512: 128 elements, 16 int32 lanes) or 32 bytes (AVX2: 64
// elements, 8 lanes) of one weight row. Byte t of block b holds elements b * B + 2t (low nibble)
// and + 1 (high nibble), so lane i sums elements b * B + 8i .. + 7, and x is stored per block as
// its B / 2 even elements, then its B / 2 odd ones.
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

constexpr int E = 8;  // elements per int32 lane: 128 per 512-bit block, 64 per 256-bit one
// Bytes ahead of the block being read that the weight stream is prefetched from (6 KB: 5 rows
// of K = 2304). The hardware prefetchers stop at 4 KB pages; with this the LM head's product
// read 23 GB/s from memory instead of 15.5 (2 threads; docs/performance.md).
constexpr int kPrefetchBytes = 6144;

// x of one call, rounded: xq [M, K] int8 in the blocks' order, xl [M, K / 8] the scale sx of
// each lane's group, xsum [M, K / gs] the float32 sums of x per group, xr [M, K / gs]
// 8 * (xsum - sx * the sum of the group's xq). B: elements per block (128: AVX-512, 64: AVX2).
struct Job {
  Int8Product p;
  int B;
  std::vector<int8_t> xq;
  std::vector<float> xl, xsum, xr;
};

#ifdef QMV_X86
// Rounds x into j's buffers (round_int8_rows, the GEMMs' rounding, then each block's order);
// false when a group's largest |x| or its sum is not finite.
bool prepare(Job& j) {
  const Int8Product& p = j.p;
  const int groups = p.K / p.gs, B = j.B;
  Int8Rows r;
  if (!round_int8_rows(p, r)) return false;
  j.xsum = std::move(r.xsum);
  j.xr = std::move(r.xr);
  j.xq.resize(static_cast<size_t>(p.M) * p.K);
  j.xl.resize(static_cast<size_t>(p.M) * p.K / E);
  for (int m = 0; m < p.M; ++m) {
    // each block's even elements, then its odd ones: the nibbles' order
    const int8_t* row = r.xq.data() + static_cast<size_t>(m) * p.K;
    int8_t* xq = j.xq.data() + static_cast<size_t>(m) * p.K;
    for (int b = 0; b < p.K; b += B) {
      for (int t = 0; t < B / 2; ++t) {
        xq[b + t] = row[b + 2 * t];
        xq[b + B / 2 + t] = row[b + 2 * t + 1];
      }
    }
    const float* sx = r.sx.data() + static_cast<size_t>(m) * groups;
    float* xl = j.xl.data() + static_cast<size_t>(m) * p.K / E;
    for (int lane = 0; lane < p.K / E; ++lane) xl[lane] = sx[lane * E / p.gs];
  }
  return true;
}

// Output rows [lo, hi) for the MB x rows from m0.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni(
    const Job& j, int lo, int hi, int m0, float* out) {
  constexpr int B = 128;
  const Int8Product& p = j.p;
  const int words = p.K / 8, groups = p.K / p.gs, blocks = p.K / B;
  const int gshift = __builtin_ctz(p.gs);  // group sizes are powers of two
  alignas(64) int idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = i * E / p.gs;
  const __m512i lane_group = _mm512_load_si512(idx);
  const int per_block = B > p.gs ? B / p.gs : 1;  // groups in a block (1, 2 or 4)
  const __mmask16 load_mask = static_cast<__mmask16>((1u << per_block) - 1);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  RowScales row(p.scales, p.biases, p.sdt, groups);  // (common.h)
  const float* sc = row.scales();
  const float* bi = row.biases();
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = p.w + static_cast<size_t>(n) * words;
    row.load(n);
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
        const __m512 xs = _mm512_loadu_ps(j.xl.data() + row * p.K / E + b * 16);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, xs), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const size_t row = static_cast<size_t>(m0 + m);
      // the term sum_g (bias[g] + 8 scale[g]) * sum(x_g), in the same vector before the reduction
      const float* xsum = j.xsum.data() + row * groups;
      const float* xr = j.xr.data() + row * groups;
      for (int g = 0; g < groups; g += 16) {
        const __mmask16 k = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
        acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, bi + g), _mm512_maskz_loadu_ps(k, xsum + g), acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sc + g), _mm512_maskz_loadu_ps(k, xr + g), acc[m]);
      }
      out[row * p.N + n] = _mm512_reduce_add_ps(acc[m]);
    }
  }
}

// The same on AVX2: a block is 32 bytes (64 elements), 8 int32 lanes of 8 elements each, the
// even x elements of a block then its odd ones. VPMADDUBSW multiplies weight bytes by x bytes
// and adds neighbours into int16 (at most 4 x 15 x 127 after the two halves' sum: no
// saturation), VPMADDWD by ones widens the pairs to int32.
template <int MB>
__attribute__((target("avx2,fma"))) void rows_avx2(const Job& j, int lo, int hi, int m0, float* out) {
  constexpr int B = 64;
  const Int8Product& p = j.p;
  const int words = p.K / 8, groups = p.K / p.gs, blocks = p.K / B;
  const int gshift = __builtin_ctz(p.gs);  // group sizes are powers of two
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  RowScales row(p.scales, p.biases, p.sdt, groups);  // (common.h)
  const float* sc = row.scales();
  const float* bi = row.biases();
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = p.w + static_cast<size_t>(n) * words;
    row.load(n);
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + b * 8) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 8));
      const __m256i qlo = _mm256_and_si256(wv, low4);
      const __m256i qhi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
      const int g0 = (b * B) >> gshift;
      // group 32: lanes 0-3 in one group, 4-7 in the next; else one group for the block
      const __m256 sv = p.gs >= B ? _mm256_set1_ps(sc[g0])
                                  : _mm256_set_m128(_mm_set1_ps(sc[g0 + 1]), _mm_set1_ps(sc[g0]));
      for (int m = 0; m < MB; ++m) {
        const size_t row = static_cast<size_t>(m0 + m);
        const int8_t* xb = j.xq.data() + row * p.K + static_cast<size_t>(b) * B;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32));
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(qlo, x0), _mm256_maddubs_epi16(qhi, x1));
        const __m256i d = _mm256_madd_epi16(pairs, ones);
        const __m256 xs = _mm256_loadu_ps(j.xl.data() + row * p.K / E + b * 8);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sv, xs), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const size_t row = static_cast<size_t>(m0 + m);
      const float* xsum = j.xsum.data() + row * groups;
      const float* xr = j.xr.data() + row * groups;
      __m256 tail = acc[m];
      int g = 0;
      for (; g + 8 <= groups; g += 8) {  // the biases' and the centring's terms, 8 groups at a time
        tail = _mm256_fmadd_ps(_mm256_loadu_ps(bi + g), _mm256_loadu_ps(xsum + g), tail);
        tail = _mm256_fmadd_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(xr + g), tail);
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(tail), _mm256_extractf128_ps(tail, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      float total = _mm_cvtss_f32(h);
      for (; g < groups; ++g) total += bi[g] * xsum[g] + sc[g] * xr[g];
      out[row * p.N + n] = total;
    }
  }
}

template <int MB>
void rows_level(const Job& j, int lo, int hi, int m0, float* out) {
  if (j.B == 128) rows_vnni<MB>(j, lo, hi, m0, out);
  else rows_avx2<MB>(j, lo, hi, m0, out);
}

void rows_all(const Job& j, int lo, int hi, float* out) {
  int m = 0;
  for (; m + 4 <= j.p.M; m += 4) rows_level<4>(j, lo, hi, m, out);
  switch (j.p.M - m) {
    case 3: rows_level<3>(j, lo, hi, m, out); break;
    case 2: rows_level<2>(j, lo, hi, m, out); break;
    case 1: rows_level<1>(j, lo, hi, m, out); break;
    default: break;
  }
}
#endif

}  // namespace

// Elements per block for rows of K: 128 (the AVX512-VNNI kernel) where K is a multiple of 128 on
// such a CPU, else 64 (the AVX2 kernel, which every AVX512-VNNI CPU also runs) where K is a
// multiple of 64, else 0 (the float32 kernels).
static int block_elements(int K) {
  if (int8_level() == 2 && K % 128 == 0) return 128;
  return int8_level() >= 1 && K % 64 == 0 ? 64 : 0;
}

// 2: AVX512-VNNI (512-bit blocks), 1: AVX2 (256-bit blocks), 0: the float32 kernels only.
int int8_level() {
#ifdef QMV_X86
  static const int level = [] {
    if (env_is("PG_EDGE_DECODE", {"float32", "off", "0"})) return 0;
    __builtin_cpu_init();
    if (cpu_simd() >= 2 && __builtin_cpu_supports("avx512vnni")) return 2;
    return cpu_simd() >= 1 ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

bool int8_available() {
  return int8_level() > 0;
}

const char* decode_kernel() {
  static const char* names[] = {"float32", "int8 on AVX2", "int8 on AVX512-VNNI"};
  return names[int8_level()];
}

bool int8_applies(const Int8Product& p) {
  if (!int8_available() || p.bits != 4) return false;
  return static_cast<int64_t>(p.N) * p.K >= kInt8MinElements && block_elements(p.K) > 0;
}

bool int8_matvec(const Int8Product& p, float* out) {
  return int8_matvecs({p}, {out});
}

bool int8_matvecs([[maybe_unused]] const std::vector<Int8Product>& ps, [[maybe_unused]] const std::vector<float*>& outs) {
#ifdef QMV_X86
  // x is rounded once (every product has the same x, K and group size); each weight's job is
  // a copy of that one with its own weight (x's buffers are a few KB).
  std::vector<Job> jobs(ps.size(), Job{ps[0], block_elements(ps[0].K), {}, {}, {}, {}});
  if (!prepare(jobs[0])) return false;
  std::vector<int> first(ps.size() + 1, 0);  // output rows of all products, one after another
  int64_t work = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    if (i > 0) {
      jobs[i] = jobs[0];
      jobs[i].p = ps[i];
    }
    first[i + 1] = first[i] + ps[i].N;
    work += static_cast<int64_t>(ps[i].N) * ps[i].K * ps[i].M;
  }
  // One split over the rows of every weight: the threads stream from one weight into the next
  // without waiting for each other at every product's end (small products read at half the
  // bandwidth of large ones when each is its own call: docs/performance.md).
  split_rows(first.back(), work, 1, [&](int lo, int hi) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const int a = std::max(lo, first[i]), b = std::min(hi, first[i + 1]);
      if (a < b) rows_all(jobs[i], a - first[i], b - first[i], outs[i]);
    }
  });
  return true;
#endif
  return false;  // not x86: int8_level() is 0 there, and qmv.cpp does not call this
}

}  // namespace pg_edge
