// pg_edge's log-probabilities over the vocabulary for MLX's CPU backend: a custom primitive.
//
// A sampled (not greedy) decode step turns the 257216 logits of PaliGemma into log-probabilities
// every token: Gemma2's final softcap, the mask of ids never emitted, a logsumexp. MLX's CPU code
// evaluates tanh and exp one element at a time, several milliseconds a token against a ~50 ms
// step of a 4-bit PaliGemma 2 3B (docs/performance.md, "Sampled decoding's log-probabilities").
// Here the row takes three passes, 16 lanes at a time (8 on AVX2; exp from vexp.h, tanh(y) = 1 -
// 2 / (exp(2y) + 1) as attn.cpp's softcap), plain C++ elsewhere:
//   1. y = cap(x) for ids < limit, -inf beyond, into out; the row's maximum;
//   2. the sum of exp(y - max);
//   3. out -= max + log(sum).
#include "logits.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "common.h"
#include "pool.h"
#include "vexp.h"

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Pass 1, plain C++, ids [from, n): y into out; returns whether one is NaN; max updated.
bool cap_portable(const float* x, float* out, int from, int n, float cap, float& top) {
  bool nan = false;
  for (int i = from; i < n; ++i) {
    const float y = cap > 0.f ? cap * std::tanh(x[i] / cap) : x[i];
    nan |= std::isnan(y);
    top = std::max(top, y);
    out[i] = y;
  }
  return nan;
}

float sum_portable(const float* y, int from, int n, float top) {
  float sum = 0.f;
  for (int i = from; i < n; ++i) sum += std::exp(std::max(y[i] - top, -88.f));
  return sum;
}

#ifdef QMV_X86
__attribute__((target("avx512f"))) float row_avx512(const float* x, float* out, int n, float cap, bool& nan) {
  const __m512 two_over = _mm512_set1_ps(cap > 0.f ? 2.f / cap : 0.f), c = _mm512_set1_ps(cap);
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  const __m512 lo = _mm512_set1_ps(-88.f), hi = _mm512_set1_ps(88.f);
  __m512 topv = _mm512_set1_ps(-kInf);
  __mmask16 bad = 0;
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 y = _mm512_loadu_ps(x + i);
    if (cap > 0.f) {
      const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(y, two_over), lo), hi);
      const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp512(z), one)));
      bad |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);  // the clamps above would hide a NaN
      y = _mm512_mul_ps(c, t);
    } else {
      bad |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    }
    topv = _mm512_max_ps(topv, y);
    _mm512_storeu_ps(out + i, y);
  }
  float top = _mm512_reduce_max_ps(topv);
  nan = cap_portable(x, out, i, n, cap, top) || bad != 0;
  return top;
}

__attribute__((target("avx512f"))) float sum_avx512(const float* y, int n, float top) {
  const __m512 t = _mm512_set1_ps(top), lo = _mm512_set1_ps(-88.f);
  __m512 s = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) s = _mm512_add_ps(s, exp512(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(y + i), t), lo)));
  return _mm512_reduce_add_ps(s) + sum_portable(y, i, n, top);
}

__attribute__((target("avx2,fma"))) float hmax256(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

__attribute__((target("avx2,fma"))) float row_avx2(const float* x, float* out, int n, float cap, bool& nan) {
  const __m256 two_over = _mm256_set1_ps(cap > 0.f ? 2.f / cap : 0.f), c = _mm256_set1_ps(cap);
  const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
  const __m256 lo = _mm256_set1_ps(-88.f), hi = _mm256_set1_ps(88.f);
  __m256 topv = _mm256_set1_ps(-kInf), bad = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 y = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    if (cap > 0.f) {
      const __m256 z = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(y, two_over), lo), hi);
      y = _mm256_mul_ps(c, _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(z), one))));
    }
    topv = _mm256_max_ps(topv, y);
    _mm256_storeu_ps(out + i, y);
  }
  float top = hmax256(topv);
  nan = cap_portable(x, out, i, n, cap, top) || _mm256_movemask_ps(bad) != 0;
  return top;
}

__attribute__((target("avx2,fma"))) float sum_avx2(const float* y, int n, float top) {
  const __m256 t = _mm256_set1_ps(top), lo = _mm256_set1_ps(-88.f);
  __m256 s = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_add_ps(s, exp256(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(y + i), t), lo)));
  return hsum256(s) + sum_portable(y, i, n, top);
}
#endif

// One row: x [V] -> out [V].
void one_row(const float* x, float* out, int V, float cap, int limit) {
  bool nan = false;
  float top = -kInf;
  const int simd = cpu_simd();
#ifdef QMV_X86
  if (simd == 2) top = row_avx512(x, out, limit, cap, nan);
  if (simd == 1) top = row_avx2(x, out, limit, cap, nan);
#endif
  if (simd == 0) nan = cap_portable(x, out, 0, limit, cap, top);
  for (int i = limit; i < V; ++i) out[i] = -kInf;
  if (nan || top == -kInf) {  // a NaN, or every id at -inf: MLX's logsumexp is NaN, so is the row
    for (int i = 0; i < V; ++i) out[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (top == kInf) {  // logsumexp = inf: inf - inf is NaN, every other id -inf
    for (int i = 0; i < V; ++i) out[i] = out[i] == kInf ? std::numeric_limits<float>::quiet_NaN() : -kInf;
    return;
  }
  float sum = 0.f;
#ifdef QMV_X86
  if (simd == 2) sum = sum_avx512(out, limit, top);
  if (simd == 1) sum = sum_avx2(out, limit, top);
#endif
  if (simd == 0) sum = sum_portable(out, 0, limit, top);
  const float lse = top + std::log(sum);
  for (int i = 0; i < limit; ++i) out[i] -= lse;
}

}  // namespace

void LogSoftmax::eval_cpu(const std::vector<array>& inputs, array& out) {
  const array& x = inputs[0];
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  encoder.dispatch([x = array::unsafe_weak_copy(x), out = array::unsafe_weak_copy(out), cap = cap_,
                    limit = limit_]() mutable {
    const int V = x.shape(-1), M = static_cast<int>(x.size() / V);
    std::vector<float> copy;
    const float* src = x.data<float>();
    if (!x.flags().row_contiguous) {
      copy = read_rows(x);
      src = copy.data();
    }
    const int lim = std::min(limit, V);
    split_rows(M, static_cast<int64_t>(M) * V * 40, 1, [&](int lo, int hi) {
      for (int m = lo; m < hi; ++m) {
        one_row(src + static_cast<size_t>(m) * V, out.data<float>() + static_cast<size_t>(m) * V, V, cap, lim);
      }
    });
  });
}

array log_softmax(const array& x, float cap, int limit, StreamOrDevice s) {
  if (x.dtype() != float32) throw std::invalid_argument("[log_softmax] x must be float32");
  if (x.ndim() < 1 || x.shape(-1) < 1) throw std::invalid_argument("[log_softmax] x [..., V]");
  if (limit < 1) throw std::invalid_argument("[log_softmax] limit: at least one id may be emitted");
  if (!(cap >= 0.f) || !std::isfinite(cap)) throw std::invalid_argument("[log_softmax] cap: 0 (none) or a positive number");
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[log_softmax] CPU streams only");
  return array(x.shape(), float32, std::make_shared<LogSoftmax>(stream, cap, limit), {x});
}

}  // namespace pg_edge
