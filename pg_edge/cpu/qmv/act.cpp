// pg_edge's tanh-approximated GELU for MLX's CPU backend: a custom primitive.
//
// gelu(x) = 0.5 x (1 + tanh(z)) = x / (1 + exp(-2 z)),  z = sqrt(2 / pi) (x + 0.044715 x^3)
//
// Why: SigLIP's and Gemma's MLPs apply it to every hidden unit of every token; MLX's CPU code
// evaluates tanh one element at a time, and in a PG2 3B-224 prefill the activations took a
// fifth of the time of the products around them (docs/performance.md, "GELU"). Here exp is
// vectorised (Cody-Waite range reduction and a degree-6 polynomial, relative error ~1e-7, as
// Cephes' expf), AVX-512 or AVX2 + FMA (common.h's cpu_simd()), plain C++ otherwise, and the
// elements are split over the matvecs' thread pool. x float32 or bfloat16, row-contiguous;
// computed in float32, the result in x's dtype.
#include "act.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "common.h"
#include "pool.h"
#include "vexp.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;
// exp's argument is clamped here: beyond, 1 + exp(-2z) is 1 or inf in float32 either way
constexpr float kMaxArg = 88.0f;

float gelu_scalar(float x) {
  const float z = kC * (x + kA * x * x * x);
  const float e = std::exp(std::fmin(std::fmax(-2.f * z, -kMaxArg), kMaxArg));
  return x / (1.f + e);
}

void gelu_portable(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_scalar(in[i]);
}

#ifdef QMV_X86
__attribute__((target("avx512f"))) void gelu_avx512(const float* in, float* out, int64_t n) {
  const __m512 c = _mm512_set1_ps(-2.f * kC), a = _mm512_set1_ps(kA), one = _mm512_set1_ps(1.f);
  const __m512 lo = _mm512_set1_ps(-kMaxArg), hi = _mm512_set1_ps(kMaxArg);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(in + i);
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 v = _mm512_mul_ps(c, _mm512_fmadd_ps(a, x3, x));  // -2 z
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm512_storeu_ps(out + i, _mm512_div_ps(x, _mm512_add_ps(one, exp512(v))));
  }
  gelu_portable(in + i, out + i, n - i);
}

__attribute__((target("avx2,fma"))) void gelu_avx2(const float* in, float* out, int64_t n) {
  const __m256 c = _mm256_set1_ps(-2.f * kC), a = _mm256_set1_ps(kA), one = _mm256_set1_ps(1.f);
  const __m256 lo = _mm256_set1_ps(-kMaxArg), hi = _mm256_set1_ps(kMaxArg);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(in + i);
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 v = _mm256_mul_ps(c, _mm256_fmadd_ps(a, x3, x));
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    _mm256_storeu_ps(out + i, _mm256_div_ps(x, _mm256_add_ps(one, exp256(v))));
  }
  gelu_portable(in + i, out + i, n - i);
}
#endif

void gelu_block(const float* in, float* out, int64_t n) {
#ifdef QMV_X86
  if (cpu_simd() == 2) return gelu_avx512(in, out, n);
  if (cpu_simd() == 1) return gelu_avx2(in, out, n);
#endif
  gelu_portable(in, out, n);
}

// Elements per chunk of the pool's split (a bfloat16 chunk goes through a float32 buffer of it).
constexpr int kChunk = 4096;

}  // namespace

void GeluTanh::eval_cpu(const std::vector<array>& inputs, array& out) {
  const array& x = inputs[0];
  if (!x.flags().row_contiguous) throw std::invalid_argument("[gelu_tanh] x must be row-contiguous");
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  encoder.dispatch([x = array::unsafe_weak_copy(x), out = array::unsafe_weak_copy(out)]() mutable {
    const int64_t n = static_cast<int64_t>(x.size());
    const int blocks = static_cast<int>((n + kChunk - 1) / kChunk);
    const bool f32 = x.dtype() == float32;
    // ~20 flops an element: the pool pays from a few hundred thousand elements on
    split_rows(blocks, n * 20, 1, [&](int lo, int hi) {
      float buf_in[kChunk], buf_out[kChunk];
      for (int b = lo; b < hi; ++b) {
        const int64_t start = static_cast<int64_t>(b) * kChunk;
        const int len = static_cast<int>(std::min<int64_t>(kChunk, n - start));
        if (f32) {
          gelu_block(x.data<float>() + start, out.data<float>() + start, len);
          continue;
        }
        load_floats(x.data<void>(), x.dtype(), start, len, buf_in);
        gelu_block(buf_in, buf_out, len);
        bfloat16_t* o = out.data<bfloat16_t>() + start;
        for (int i = 0; i < len; ++i) o[i] = static_cast<bfloat16_t>(buf_out[i]);
      }
    });
  });
}

void GeluTanh::eval_gpu(const std::vector<array>&, array&) {
  throw std::runtime_error("[gelu_tanh] CPU only");
}

array gelu_tanh(const array& x, StreamOrDevice s) {
  if (x.dtype() != float32 && x.dtype() != bfloat16) {
    throw std::invalid_argument("[gelu_tanh] x must be float32 or bfloat16");
  }
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[gelu_tanh] CPU streams only");
  return array(x.shape(), x.dtype(), std::make_shared<GeluTanh>(stream), {x});
}

}  // namespace pg_edge
