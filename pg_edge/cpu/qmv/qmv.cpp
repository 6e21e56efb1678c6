// pg_edge's quantized matrix-vector product for MLX's CPU backend: a custom primitive.
//
// y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]),  g = k / group_size
//
// Shapes: x [..., K] (float32 / bfloat16 / float16, any strides), w uint32 [N, K * bits / 32]
// (mx.quantize's affine packing: element k of a row at bits (k % (32 / bits)) * bits of word
// k / (32 / bits)), scales and biases [N, K / group_size] (float32 / bfloat16 / float16), w,
// scales and biases row-contiguous. Output [..., N] in the promoted dtype of x and scales.
// bits 4 and 8, group size 32 / 64 / 128. Computed per row as
//   sum_g scale[g] * (x_g . q_g) + sum_g bias[g] * sum(x_g)
// in float32 (AVX-512F, else AVX2 + FMA, when the CPU has them, checked at run time; plain C++
// otherwise; PG_EDGE_QMV_SIMD=avx2|portable caps the choice: common.cpp), output rows split
// over the thread pool shared with fmv.cpp (pool.cpp; PG_EDGE_QMV_THREADS sets its size).
// 4-bit weights of 2^20+ elements take qmv_int8.cpp's kernels instead (x rounded to int8 per
// group; AVX512-VNNI or AVX2; over 8 x rows on AVX512-VNNI, qmm_int8.cpp's GEMM);
// PG_EDGE_DECODE=float32 keeps these float32 kernels.
// quantized_matvecs runs several weights' products of one x as one primitive: x read once, the
// rows of all the weights split over the pool as one range (`products` below).
#include "qmv.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "qmv_int8.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

using namespace mlx::core;

namespace {

// What one call computes on: x in float32, per x row both as read (xs) and permuted (xp) for
// the AVX2 blocks, and each row's group sums.
struct Job {
  int M, N, K, gs, bits;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  Dtype sdt;
  std::vector<float> xs, xp, xsum;  // [M, K], [M, K], [M, K / gs]
  int simd;   // 0 portable, 1 AVX2 + FMA, 2 AVX-512F
  int lanes;  // float lanes of the vector kernel (xp's permutation): 8 or 16
};

// ------------------------------------------------------------------ portable kernel

// Rows [lo, hi) of the output, out[m * N + n] in float32.
void rows_portable(const Job& j, int lo, int hi, float* out) {
  const int per_word = 32 / j.bits, words = j.K / per_word, groups = j.K / j.gs;
  const uint32_t mask = (1u << j.bits) - 1;
  const int words_per_group = j.gs / per_word;
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = j.w + static_cast<size_t>(n) * words;
    for (int m = 0; m < j.M; ++m) {
      const float* x = j.xs.data() + static_cast<size_t>(m) * j.K;
      float acc = 0.f;
      for (int g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int wi = g * words_per_group; wi < (g + 1) * words_per_group; ++wi) {
          uint32_t word = wr[wi];
          const float* xw = x + wi * per_word;
          for (int e = 0; e < per_word; ++e) {
            dot += static_cast<float>((word >> (e * j.bits)) & mask) * xw[e];
          }
        }
        size_t si = static_cast<size_t>(n) * groups + g;
        acc += to_float(j.scales, j.sdt, si) * dot +
            to_float(j.biases, j.sdt, si) * j.xsum[static_cast<size_t>(m) * groups + g];
      }
      out[static_cast<size_t>(m) * j.N + n] = acc;
    }
  }
}

// Words [from, to) of a row (those after the vector kernels' last whole block: 4 bits, group
// 32, K % 64 == 32), scaled per group, without the biases' term: plain code.
template <int BITS>
float tail_dot(const uint32_t* wr, const float* x, const float* sc, int gs, int from, int to) {
  constexpr int PER_WORD = 32 / BITS;
  float total = 0.f;
  for (int wi = from; wi < to; ++wi) {
    float dot = 0.f;
    for (int e = 0; e < PER_WORD; ++e) {
      dot += static_cast<float>((wr[wi] >> (e * BITS)) & ((1u << BITS) - 1)) * x[wi * PER_WORD + e];
    }
    total += sc[wi * PER_WORD / gs] * dot;
  }
  return total;
}

// ------------------------------------------------------------------ AVX2 kernel

#ifdef QMV_X86
// One block = 8 words (one 256-bit load): 64 elements at 4 bits, 32 at 8 bits. Lane i of
// shift j holds element i * per_word + j of the block, so x is stored permuted the same way
// (xp[block * B + j * 8 + i] = x[block * B + i * per_word + j]).
template <int BITS, int MB>
__attribute__((target("avx2,fma"))) void rows_avx2(
    const Job& j, int lo, int hi, int m0, float* out) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr int B = 8 * PER_WORD;
  const int words = j.K / PER_WORD, groups = j.K / j.gs, blocks = j.K / B;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int gshift = __builtin_ctz(j.gs);  // group sizes are powers of two
  RowScales row(j.scales, j.biases, j.sdt, groups);  // (common.h)
  const float* sc = row.scales();
  const float* bi = row.biases();
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = j.w + static_cast<size_t>(n) * words;
    row.load(n);
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 8));
      __m256 d0[MB], d1[MB];
      for (int m = 0; m < MB; ++m) d0[m] = d1[m] = _mm256_setzero_ps();
      const float* xb = j.xp.data() + static_cast<size_t>(m0) * j.K + b * B;
#pragma GCC unroll 8
      for (int s = 0; s < PER_WORD; ++s) {
        __m256i qi = _mm256_srli_epi32(wv, s * BITS);
        if (s + 1 < PER_WORD) qi = _mm256_and_si256(qi, mask);
        const __m256 q = _mm256_cvtepi32_ps(qi);
        for (int m = 0; m < MB; ++m) {
          const __m256 xv = _mm256_loadu_ps(xb + static_cast<size_t>(m) * j.K + s * 8);
          if (s & 1) d1[m] = _mm256_fmadd_ps(q, xv, d1[m]);
          else d0[m] = _mm256_fmadd_ps(q, xv, d0[m]);
        }
      }
      __m256 sv;
      const int g0 = (b * B) >> gshift;
      if (j.gs >= B) {
        sv = _mm256_set1_ps(sc[g0]);
      } else {  // 4 bits, group 32: lanes 0-3 in one group, 4-7 in the next
        sv = _mm256_set_m128(_mm_set1_ps(sc[g0 + 1]), _mm_set1_ps(sc[g0]));
      }
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(d0[m], d1[m]), sv, acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      const int mm = m0 + m;
      const float* xsum = j.xsum.data() + static_cast<size_t>(mm) * groups;
      int g = 0;
      for (; g + 8 <= groups; g += 8) {  // the biases' term, 8 groups at a time
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(bi + g), _mm256_loadu_ps(xsum + g), acc[m]);
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      float total = _mm_cvtss_f32(h);
      const float* x = j.xs.data() + static_cast<size_t>(mm) * j.K;
      total += tail_dot<BITS>(wr, x, sc, j.gs, blocks * 8, words);
      for (; g < groups; ++g) total += bi[g] * xsum[g];
      out[static_cast<size_t>(mm) * j.N + n] = total;
    }
  }
}

// The same with 512-bit vectors: one block = 16 words, lane i of shift j holds element
// i * per_word + j of the block; a block may span up to 4 groups (4 bits, group 32), whose
// scales are spread over the lanes by one permute.
template <int BITS, int MB>
__attribute__((target("avx512f"))) void rows_avx512(const Job& j, int lo, int hi, int m0, float* out) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr int B = 16 * PER_WORD;
  const int words = j.K / PER_WORD, groups = j.K / j.gs, blocks = j.K / B;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int gshift = __builtin_ctz(j.gs);  // group sizes are powers of two
  alignas(64) int idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = i * PER_WORD / j.gs;
  const __m512i lane_group = _mm512_load_si512(idx);
  const int per_block = B > j.gs ? B / j.gs : 1;  // groups in a block (1, 2 or 4)
  const __mmask16 load_mask = static_cast<__mmask16>((1u << per_block) - 1);
  RowScales row(j.scales, j.biases, j.sdt, groups);  // (common.h)
  const float* sc = row.scales();
  const float* bi = row.biases();
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = j.w + static_cast<size_t>(n) * words;
    row.load(n);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
      const __m512i wv = _mm512_loadu_si512(wr + b * 16);
      __m512 d0[MB], d1[MB];
      for (int m = 0; m < MB; ++m) d0[m] = d1[m] = _mm512_setzero_ps();
      const float* xb = j.xp.data() + static_cast<size_t>(m0) * j.K + b * B;
#pragma GCC unroll 8
      for (int s = 0; s < PER_WORD; ++s) {
        const __m512i qi = s == 0 ? wv : _mm512_srli_epi32(wv, s * BITS);
        // 4 bits: the table lookup reads the low 4 bits of each lane (no mask, no int->float
        // conversion: both would compete with the shifts for one port); 8 bits: mask + convert
        const __m512 q = BITS == 4 ? _mm512_permutexvar_ps(qi, table)
            : _mm512_cvtepi32_ps(s + 1 < PER_WORD ? _mm512_and_si512(qi, mask) : qi);
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = _mm512_loadu_ps(xb + static_cast<size_t>(m) * j.K + s * 16);
          if (s & 1) d1[m] = _mm512_fmadd_ps(q, xv, d1[m]);
          else d0[m] = _mm512_fmadd_ps(q, xv, d0[m]);
        }
      }
      const int g0 = (b * B) >> gshift;
      const __m512 sv = per_block == 1
          ? _mm512_set1_ps(sc[g0])
          : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(load_mask, sc + g0));
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(d0[m], d1[m]), sv, acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      const int mm = m0 + m;
      // the biases' term, sum_g bias[g] * sum(x_g), in the same vector before the reduction
      const float* xsum = j.xsum.data() + static_cast<size_t>(mm) * groups;
      for (int g = 0; g < groups; g += 16) {
        const __mmask16 k = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
        acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, bi + g), _mm512_maskz_loadu_ps(k, xsum + g), acc[m]);
      }
      float total = _mm512_reduce_add_ps(acc[m]);
      const float* x = j.xs.data() + static_cast<size_t>(mm) * j.K;
      total += tail_dot<BITS>(wr, x, sc, j.gs, blocks * 16, words);
      out[static_cast<size_t>(mm) * j.N + n] = total;
    }
  }
}

template <int BITS>
void rows_avx512_all(const Job& j, int lo, int hi, float* out) {
  int m = 0;
  for (; m + 4 <= j.M; m += 4) rows_avx512<BITS, 4>(j, lo, hi, m, out);
  switch (j.M - m) {
    case 3: rows_avx512<BITS, 3>(j, lo, hi, m, out); break;
    case 2: rows_avx512<BITS, 2>(j, lo, hi, m, out); break;
    case 1: rows_avx512<BITS, 1>(j, lo, hi, m, out); break;
    default: break;
  }
}

template <int BITS>
void rows_avx2_all(const Job& j, int lo, int hi, float* out) {
  int m = 0;
  for (; m + 4 <= j.M; m += 4) rows_avx2<BITS, 4>(j, lo, hi, m, out);
  switch (j.M - m) {
    case 3: rows_avx2<BITS, 3>(j, lo, hi, m, out); break;
    case 2: rows_avx2<BITS, 2>(j, lo, hi, m, out); break;
    case 1: rows_avx2<BITS, 1>(j, lo, hi, m, out); break;
    default: break;
  }
}

#endif

void rows(const Job& j, int lo, int hi, float* out) {
#ifdef QMV_X86
  if (j.simd == 2) {
    if (j.bits == 4) return rows_avx512_all<4>(j, lo, hi, out);
    if (j.bits == 8) return rows_avx512_all<8>(j, lo, hi, out);
  }
  if (j.simd == 1) {
    if (j.bits == 4) return rows_avx2_all<4>(j, lo, hi, out);
    if (j.bits == 8) return rows_avx2_all<8>(j, lo, hi, out);
  }
#endif
  rows_portable(j, lo, hi, out);
}

// Takes x's rows in float32: xs [M, K] as is, xp [M, K] permuted per block of the
// vector kernel (xp[b * B + j * lanes + i] = x[b * B + i * per_word + j]), xsum.
void prepare_x(Job& j, std::vector<float> xs_rows) {
  const int per_word = 32 / j.bits, L = j.lanes, B = L * per_word, groups = j.K / j.gs;
  j.xs = std::move(xs_rows);
  j.xp.resize(j.xs.size());
  j.xsum.assign(static_cast<size_t>(j.M) * groups, 0.f);
  for (int m = 0; m < j.M; ++m) {
    const float* xs = j.xs.data() + static_cast<size_t>(m) * j.K;
    float* xp = j.xp.data() + static_cast<size_t>(m) * j.K;
    const int whole = j.K / B * B;  // the rest (a part block) is read from xs
    for (int k = 0; k < whole; ++k) {
      const int b = k / B, r = k % B;
      xp[b * B + (r % per_word) * L + r / per_word] = xs[k];
    }
    for (int k = 0; k < j.K; ++k) j.xsum[static_cast<size_t>(m) * groups + k / j.gs] += xs[k];
  }
}

// One weight of a call, and where its float32 result goes ([M, N] row-contiguous).
struct Weight {
  const uint32_t* w;
  const void* scales;
  const void* biases;
  Dtype sdt;
  int N;
  float* res;
};

// res = x @ dequantize(w).T for every weight (the same K, group size and bits): x rows xs
// [M, K] float32. Weights that take the int8 kernels (`int8`, large 4-bit, decode-sized M) run
// as one split of all their rows, those left as another on the float32 kernels, x prepared once
// for each; many rows (prefill) run each weight's GEMM. Every weight's result is the one a call
// of its own gives.
void products(std::vector<float> xs, int M, int K, int gs, int bits, bool int8, const std::vector<Weight>& ws) {
  std::vector<Weight> rest;
  std::vector<Int8Product> ips;
  std::vector<float*> outs;
  for (const Weight& wt : ws) {
    const Int8Product ip{M, wt.N, K, gs, bits, xs.data(), wt.w, wt.scales, wt.biases, wt.sdt};
    if (!int8 || !int8_applies(ip)) {
      rest.push_back(wt);
    } else if (M > 8) {  // prefill: the GEMM layouts (qmm_int8.cpp on AVX512-VNNI, qmm_int8_avx2.cpp on AVX2)
      if (!(int8_level() == 2 ? int8_matmul(ip, wt.res) : int8_matmul_avx2(ip, wt.res))) rest.push_back(wt);
    } else {
      ips.push_back(ip);
      outs.push_back(wt.res);
    }
  }
  // decode: x in int8 (qmv_int8.cpp), unless x holds inf / NaN
  if (!ips.empty() && !int8_matvecs(ips, outs)) {
    for (const Weight& wt : ws) {
      if (std::find(outs.begin(), outs.end(), wt.res) != outs.end()) rest.push_back(wt);
    }
  }
  if (rest.empty()) return;
  Job base{M, 0, K, gs, bits, nullptr, nullptr, nullptr, float32, {}, {}, {}, cpu_simd(), cpu_simd() == 2 ? 16 : 8};
  prepare_x(base, std::move(xs));
  std::vector<Job> jobs(rest.size(), base);
  std::vector<int> first(rest.size() + 1, 0);  // output rows of all weights, one after another
  for (size_t i = 0; i < rest.size(); ++i) {
    jobs[i].N = rest[i].N;
    jobs[i].w = rest[i].w;
    jobs[i].scales = rest[i].scales;
    jobs[i].biases = rest[i].biases;
    jobs[i].sdt = rest[i].sdt;
    first[i + 1] = first[i] + rest[i].N;
  }
  split_rows(first.back(), static_cast<int64_t>(first.back()) * K * M, 1, [&](int lo, int hi) {
    for (size_t i = 0; i < rest.size(); ++i) {
      const int a = std::max(lo, first[i]), b = std::min(hi, first[i + 1]);
      if (a < b) rows(jobs[i], a - first[i], b - first[i], rest[i].res);
    }
  });
}

void check_contiguous(const std::vector<array>& inputs) {
  for (size_t i = 1; i < inputs.size(); ++i) {
    if (!inputs[i].flags().row_contiguous) {
      throw std::invalid_argument("[qmv] weights, scales and biases must be row-contiguous");
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ primitive

void QuantizedMatvecs::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  check_contiguous(inputs);
  auto& encoder = cpu::get_command_encoder(stream());
  for (const array& a : inputs) encoder.set_input_array(a);
  for (array& out : outputs) {
    out.set_data(allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
  }
  std::vector<array> ins, outs;
  for (const array& a : inputs) ins.push_back(array::unsafe_weak_copy(a));
  for (const array& a : outputs) outs.push_back(array::unsafe_weak_copy(a));
  encoder.dispatch([ins = std::move(ins), outs = std::move(outs), gs = group_size_, bits = bits_,
                    int8 = int8_]() mutable {
    const array& x = ins[0];
    const int K = x.shape(-1), M = static_cast<int>(x.size() / K);
    std::vector<std::vector<float>> tmp(outs.size());
    std::vector<Weight> ws;
    for (size_t i = 0; i < outs.size(); ++i) {
      const array &w = ins[1 + 3 * i], &scales = ins[2 + 3 * i], &biases = ins[3 + 3 * i];
      const int N = w.shape(0);
      float* res = outs[i].dtype() == float32 ? outs[i].data<float>() : nullptr;
      if (res == nullptr) {
        tmp[i].resize(static_cast<size_t>(M) * N);
        res = tmp[i].data();
      }
      ws.push_back({w.data<uint32_t>(), scales.data<void>(), biases.data<void>(), scales.dtype(), N, res});
    }
    products(read_rows(x), M, K, gs, bits, int8, ws);
    for (size_t i = 0; i < outs.size(); ++i) {
      if (!tmp[i].empty()) write_out(outs[i], tmp[i].data());
    }
  });
}

namespace {

// The checks of one weight of a call; its output shape.
Shape check_weight(const array& x, const array& w, const array& scales, const array& biases, int group_size, int bits) {
  if (x.ndim() < 1 || w.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2) {
    throw std::invalid_argument("[qmv] x [..., K], w / scales / biases 2-D");
  }
  if (w.dtype() != uint32) throw std::invalid_argument("[qmv] w must be uint32");
  const int K = x.shape(-1), N = w.shape(0);
  if (K % group_size != 0 || static_cast<int64_t>(w.shape(1)) * 32 / bits != K ||
      scales.shape(0) != N || scales.shape(1) != K / group_size || biases.shape() != scales.shape()) {
    throw std::invalid_argument("[qmv] shapes of x, w, scales, biases do not match");
  }
  auto floating = [](Dtype t) { return t == float32 || t == bfloat16 || t == float16; };
  if (!floating(x.dtype()) || !floating(scales.dtype()) || biases.dtype() != scales.dtype()) {
    throw std::invalid_argument("[qmv] x, scales, biases must be float32 / bfloat16 / float16");
  }
  Shape out_shape = x.shape();
  out_shape.back() = N;
  return out_shape;
}

void check_format(int group_size, int bits) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[qmv] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[qmv] group_size must be 32, 64 or 128");
  }
}

Stream cpu_stream(StreamOrDevice s) {
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[qmv] CPU streams only");
  return stream;
}

}  // namespace

array quantized_matvec(const array& x, const array& w, const array& scales, const array& biases,
                       int group_size, int bits, bool int8, StreamOrDevice s) {
  return quantized_matvecs(x, {w, scales, biases}, group_size, bits, int8, s)[0];
}

std::vector<array> quantized_matvecs(const array& x, const std::vector<array>& weights, int group_size, int bits,
                                     bool int8, StreamOrDevice s) {
  check_format(group_size, bits);
  if (weights.empty() || weights.size() % 3 != 0) {
    throw std::invalid_argument("[qmv] weights: w, scales, biases of each product, one after another");
  }
  std::vector<Shape> shapes;
  std::vector<Dtype> dtypes;
  std::vector<array> inputs{x};
  for (size_t i = 0; i < weights.size(); i += 3) {
    shapes.push_back(check_weight(x, weights[i], weights[i + 1], weights[i + 2], group_size, bits));
    dtypes.push_back(promote_types(x.dtype(), weights[i + 1].dtype()));
    inputs.insert(inputs.end(), {weights[i], weights[i + 1], weights[i + 2]});
  }
  return array::make_arrays(std::move(shapes), dtypes,
                            std::make_shared<QuantizedMatvecs>(cpu_stream(s), group_size, bits, int8), inputs);
}

}  // namespace pg_edge
