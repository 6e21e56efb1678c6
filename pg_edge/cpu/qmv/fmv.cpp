// pg_edge's 16-bit float matrix-vector product for MLX's CPU backend: a custom primitive.
//
// y[m, n] = sum_k x[m, k] * w[n, k]
//
// Shapes: x [..., K] (float32 / bfloat16 / float16, any strides; M = x.size / K rows, meant for
// M <= 8: decode), w [N, K] bfloat16 or float16 (a model's stored Linear or tied embedding
// weight, read in place when row-contiguous, else copied once). Output [..., N] in the promoted
// dtype of x and w. x is read once into float32 rows, each weight is widened to float32 as it is loaded (bfloat16: zero-extend and
// shift by 16 bits, exact; float16: the CPU's conversion, F16C / AVX-512, exact), and the sums
// run in float32 FMAs. The kernels compute a tile of NB output rows x MB x rows at a time, so
// each x load serves NB weight rows and each weight load MB x rows; the tail of K past the last
// whole vector is a masked load (AVX-512) or plain code (AVX2). AVX-512F+BW+VL, else AVX2 + FMA
// (+ F16C for float16 weights), else plain C++, as common.cpp chooses; output rows are split
// over the thread pool shared with qmv.cpp (pool.cpp).
#include "fmv.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

namespace pg_edge {

using namespace mlx::core;

namespace {

// Output rows per tile: NB weight rows are read side by side (NB streams for the prefetcher).
constexpr int NB = 4;
// Weights prefetched this many elements (1 KB) ahead of the loads, once per 64-byte line: the
// hardware prefetcher alone left a thread's read short of the measured bandwidth
// (docs/performance.md).
constexpr int PF = 512;

struct Job {
  int M, N, K;
  const uint16_t* w;  // [N, K] bfloat16 or float16 bits
  bool bf16;
  const float* x;  // [M, K] float32
  int simd;        // 0 portable, 1 AVX2 + FMA, 2 AVX-512
};

// ------------------------------------------------------------------ portable kernel

// Rows [lo, hi) of the output, out[m * N + n] in float32: each weight row widened into a
// float32 buffer, then one dot product per x row (4 partial sums: independent adds).
void rows_portable(const Job& j, int lo, int hi, float* out) {
  std::vector<float> wf(j.K);
  for (int n = lo; n < hi; ++n) {
    load_floats(j.w, j.bf16 ? bfloat16 : float16, static_cast<size_t>(n) * j.K, j.K, wf.data());
    for (int m = 0; m < j.M; ++m) {
      const float* x = j.x + static_cast<size_t>(m) * j.K;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      int k = 0;
      for (; k + 4 <= j.K; k += 4) {
        for (int e = 0; e < 4; ++e) s[e] += wf[k + e] * x[k + e];
      }
      for (; k < j.K; ++k) s[0] += wf[k] * x[k];
      out[static_cast<size_t>(m) * j.N + n] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
}

#ifdef QMV_X86

// ------------------------------------------------------------------ AVX-512 kernel

template <bool BF16>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 widen16(__m256i h) {
  if constexpr (BF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}

// The tile of output rows [n, n + R) (R <= NB) x x rows [m0, m0 + MB): 16 weights per step.
template <bool BF16, int R, int MB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_avx512(const Job& j, int n, int m0, float* out) {
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = j.w + static_cast<size_t>(n + r) * j.K;
  const float* x = j.x + static_cast<size_t>(m0) * j.K;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int k = 0; k < j.K; k += 16) {
    // all lanes but in the last part vector: there, zeros past K (loads of full vectors too
    // run at the plain loads' rate)
    const __mmask16 mask = j.K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (j.K - k)) - 1);
    __m512 wv[R];
    if ((k & 31) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + PF), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) wv[r] = widen16<BF16>(_mm256_maskz_loadu_epi16(mask, w[r] + k));
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + static_cast<size_t>(m) * j.K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) out[static_cast<size_t>(m0 + m) * j.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// x rows 4 at a time (R x 4 accumulators, R weights and one x in registers: at most 21 of 32).
template <bool BF16, int R>
void tiles_avx512(const Job& j, int n, float* out) {
  int m = 0;
  for (; m + 4 <= j.M; m += 4) tile_avx512<BF16, R, 4>(j, n, m, out);
  switch (j.M - m) {
    case 3: tile_avx512<BF16, R, 3>(j, n, m, out); break;
    case 2: tile_avx512<BF16, R, 2>(j, n, m, out); break;
    case 1: tile_avx512<BF16, R, 1>(j, n, m, out); break;
    default: break;
  }
}

// ------------------------------------------------------------------ AVX2 kernel

template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(__m128i h) {
  if constexpr (BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

// The same tile with 8 weights per step; the part of K past the last 8 in plain code.
template <bool BF16, int R, int MB>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Job& j, int n, int m0, float* out) {
  const uint16_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = j.w + static_cast<size_t>(n + r) * j.K;
  const float* x = j.x + static_cast<size_t>(m0) * j.K;
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= j.K; k += 8) {
    if ((k & 31) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + PF), _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen8<BF16>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k)));
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + static_cast<size_t>(m) * j.K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  const int tail = k;
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      float total = _mm_cvtss_f32(h);
      const float* xm = x + static_cast<size_t>(m) * j.K;
      for (int kk = tail; kk < j.K; ++kk) {
        total += to_float(w[r], BF16 ? bfloat16 : float16, kk) * xm[kk];
      }
      out[static_cast<size_t>(m0 + m) * j.N + n + r] = total;
    }
  }
}

// x rows 2 at a time (R x 2 accumulators, R weights and one x: 13 of the 16 registers).
template <bool BF16, int R>
void tiles_avx2(const Job& j, int n, float* out) {
  int m = 0;
  for (; m + 2 <= j.M; m += 2) tile_avx2<BF16, R, 2>(j, n, m, out);
  if (m < j.M) tile_avx2<BF16, R, 1>(j, n, m, out);
}

// Output rows [lo, hi) in tiles of NB, then one at a time; all x rows for each tile, so the
// tile's weights come from memory once and from the cache for the later x rows.
template <bool BF16>
void rows_simd(const Job& j, int lo, int hi, float* out) {
  int n = lo;
  for (; n + NB <= hi; n += NB) {
    if (j.simd == 2) tiles_avx512<BF16, NB>(j, n, out);
    else tiles_avx2<BF16, NB>(j, n, out);
  }
  for (; n < hi; ++n) {
    if (j.simd == 2) tiles_avx512<BF16, 1>(j, n, out);
    else tiles_avx2<BF16, 1>(j, n, out);
  }
}

#endif

void rows(const Job& j, int lo, int hi, float* out) {
#ifdef QMV_X86
  if (j.simd > 0) return j.bf16 ? rows_simd<true>(j, lo, hi, out) : rows_simd<false>(j, lo, hi, out);
#endif
  rows_portable(j, lo, hi, out);
}

}  // namespace

// ------------------------------------------------------------------ primitive

void FloatMatvec::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const array& x = inputs[0];
  const array& w = inputs[1];
  array& out = outputs[0];
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_output_array(out);
  const int K = x.shape(-1), N = w.shape(0), M = static_cast<int>(x.size() / K);
  encoder.dispatch([x = array::unsafe_weak_copy(x), w = array::unsafe_weak_copy(w),
                    out = array::unsafe_weak_copy(out), M, N, K]() mutable {
    const std::vector<float> xs = read_rows(x);
    int level = cpu_simd();
    // float16 weights on AVX2 need F16C (every AVX2 CPU so far has it; checked all the same)
    if (level == 1 && w.dtype() == float16 && !cpu_f16c()) level = 0;
    // w as stored when row-contiguous (a model's weight); a strided view copied once
    const uint16_t* wp = w.data<uint16_t>();
    std::vector<uint16_t> wcopy;
    if (!w.flags().row_contiguous) {
      wcopy.resize(static_cast<size_t>(N) * K);
      const int64_t s0 = w.strides()[0], s1 = w.strides()[1];
      for (int n = 0; n < N; ++n)
        for (int k = 0; k < K; ++k) wcopy[static_cast<size_t>(n) * K + k] = wp[n * s0 + k * s1];
      wp = wcopy.data();
    }
    const Job j{M, N, K, wp, w.dtype() == bfloat16, xs.data(), level};
    std::vector<float> tmp;
    float* res = out.dtype() == float32 ? out.data<float>() : nullptr;
    if (res == nullptr) {
      tmp.resize(static_cast<size_t>(M) * N);
      res = tmp.data();
    }
    split_rows(N, static_cast<int64_t>(N) * K * M, NB, [&](int lo, int hi) { rows(j, lo, hi, res); });
    if (!tmp.empty()) write_out(out, tmp.data());
  });
}

void FloatMatvec::eval_gpu(const std::vector<array>&, std::vector<array>&) {
  throw std::runtime_error("[fmv] CPU only");
}

array float_matvec(const array& x, const array& w, StreamOrDevice s) {
  if (x.ndim() < 1 || w.ndim() != 2) throw std::invalid_argument("[fmv] x [..., K], w [N, K]");
  if (w.dtype() != bfloat16 && w.dtype() != float16) {
    throw std::invalid_argument("[fmv] w must be bfloat16 or float16");
  }
  if (x.dtype() != float32 && x.dtype() != bfloat16 && x.dtype() != float16) {
    throw std::invalid_argument("[fmv] x must be float32 / bfloat16 / float16");
  }
  if (x.shape(-1) != w.shape(1)) throw std::invalid_argument("[fmv] shapes of x and w do not match");
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[fmv] CPU streams only");
  Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  return array(out_shape, promote_types(x.dtype(), w.dtype()), std::make_shared<FloatMatvec>(stream),
               {x, w});
}

}  // namespace pg_edge
