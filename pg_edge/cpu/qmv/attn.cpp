// pg_edge's decode attention for MLX's CPU backend: a custom primitive (see attn.h).
//
// A decode step's attention is one query token per row against the whole KV cache. MLX's CPU
// path for Gemma2's softcapped attention runs it as five ops: two batched products through
// BLAS (each a few hundred keys of 256 floats per head, as sgemm calls with their set-up), the
// softcap, the mask and the softmax, about 0.3 ms a layer for 260 cached tokens on the AMD EPYC
// (docs/performance.md, "Decode attention in one kernel"). Here each (row, query head) is one
// pass on one thread of the pool: the scores q . k_s read the cache's key rows where they lie
// (its slices, no copy), the softcap and the softmax run 16 lanes at a time (8 on AVX2; vexp.h), and
// the values are summed into the output row with one FMA per 16 floats. Float32 throughout, the
// scores' order as MLX's: scale * q first, then the dot, cap, mask, softmax.
#include "attn.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"
#include "vexp.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

#ifdef QMV_X86
// The float32 minimum the model's masked scores take (mx.finfo(mx.float32).min).
constexpr float kMasked = -FLT_MAX;

// Masked scores take the float32 minimum, as the model's mx.where does; whether any was masked.
bool apply_mask(float* scores, const bool* m, int64_t ms, int S) {
  bool masked = false;
  if (m != nullptr) {
    for (int i = 0; i < S; ++i) {
      if (!m[i * ms]) scores[i] = kMasked, masked = true;
    }
  }
  return masked;
}

// exp(min - max) is 0 in float32, but the vector exp floors at exp(-88): the masked
// probabilities set to 0 again; returns the new sum.
float zero_masked(float* scores, const bool* m, int64_t ms, int S) {
  float sum = 0.f;
  for (int i = 0; i < S; ++i) {
    if (!m[i * ms]) scores[i] = 0.f;
    sum += scores[i];
  }
  return sum;
}

// One (row, query head): out[0, E) from q[0, E), key / value rows at k + s * ks, v + s * vs,
// mask entries at m + s * ms (m null: none). scores: S floats of scratch.
__attribute__((target("avx512f"))) void one_head(const float* q, const float* k, int64_t ks, const float* v,
                                                 int64_t vs, const bool* m, int64_t ms, int S, int E, float scale,
                                                 float softcap, float* scores, float* out) {
  const int V = E / 16;
  __m512 qv[16];  // E <= 256 (checked)
  for (int j = 0; j < V; ++j) qv[j] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * j), _mm512_set1_ps(scale));
  for (int s = 0; s < S; ++s) {
    const float* kr = k + s * ks;
    __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr)), a1 = _mm512_setzero_ps();
    for (int j = 1; j < V; ++j) {
      if (j & 1) a1 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(kr + 16 * j), a1);
      else a0 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(kr + 16 * j), a0);
    }
    scores[s] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
  int s = 0;
  if (softcap > 0.f) {  // softcap * tanh(x / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
    const __m512 two_over = _mm512_set1_ps(2.f / softcap), c = _mm512_set1_ps(softcap);
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    const __m512 lo = _mm512_set1_ps(-88.f), hi = _mm512_set1_ps(88.f);
    for (; s + 16 <= S; s += 16) {
      const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(scores + s), two_over), lo), hi);
      const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp512(y), one)));
      _mm512_storeu_ps(scores + s, _mm512_mul_ps(c, t));
    }
    for (; s < S; ++s) scores[s] = softcap * std::tanh(scores[s] / softcap);
  }
  const bool masked = apply_mask(scores, m, ms, S);
  float mx_ = kMasked;
  for (int i = 0; i < S; ++i) mx_ = std::max(mx_, scores[i]);
  const __m512 mv = _mm512_set1_ps(mx_), lo = _mm512_set1_ps(-88.f);
  __m512 sumv = _mm512_setzero_ps();
  for (s = 0; s + 16 <= S; s += 16) {
    const __m512 e = exp512(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + s), mv), lo));
    _mm512_storeu_ps(scores + s, e);
    sumv = _mm512_add_ps(sumv, e);
  }
  float sum = _mm512_reduce_add_ps(sumv);
  for (; s < S; ++s) {
    scores[s] = std::exp(std::max(scores[s] - mx_, -88.f));
    sum += scores[s];
  }
  if (masked && mx_ > kMasked) sum = zero_masked(scores, m, ms, S);
  __m512 acc[16];
  for (int j = 0; j < V; ++j) acc[j] = _mm512_setzero_ps();
  for (s = 0; s < S; ++s) {
    const __m512 p = _mm512_set1_ps(scores[s]);
    const float* vr = v + s * vs;
    for (int j = 0; j < V; ++j) acc[j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * j), acc[j]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int j = 0; j < V; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(acc[j], inv));
}

// The same on AVX2 + FMA, 8 lanes at a time (E a multiple of 16: two vectors per 16 floats).

__attribute__((target("avx2,fma"))) void one_head_avx2(const float* q, const float* k, int64_t ks, const float* v,
                                                       int64_t vs, const bool* m, int64_t ms, int S, int E, float scale,
                                                       float softcap, float* scores, float* out) {
  const int V = E / 8;
  __m256 qv[32];  // E <= 256 (checked)
  for (int j = 0; j < V; ++j) qv[j] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * j), _mm256_set1_ps(scale));
  for (int s = 0; s < S; ++s) {
    const float* kr = k + s * ks;
    __m256 a0 = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr)), a1 = _mm256_setzero_ps();
    for (int j = 1; j < V; ++j) {
      if (j & 1) a1 = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(kr + 8 * j), a1);
      else a0 = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(kr + 8 * j), a0);
    }
    scores[s] = hsum256(_mm256_add_ps(a0, a1));
  }
  int s = 0;
  if (softcap > 0.f) {
    const __m256 two_over = _mm256_set1_ps(2.f / softcap), c = _mm256_set1_ps(softcap);
    const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
    const __m256 lo = _mm256_set1_ps(-88.f), hi = _mm256_set1_ps(88.f);
    for (; s + 8 <= S; s += 8) {
      const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(scores + s), two_over), lo), hi);
      const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(y), one)));
      _mm256_storeu_ps(scores + s, _mm256_mul_ps(c, t));
    }
    for (; s < S; ++s) scores[s] = softcap * std::tanh(scores[s] / softcap);
  }
  const bool masked = apply_mask(scores, m, ms, S);
  float mx_ = kMasked;
  for (int i = 0; i < S; ++i) mx_ = std::max(mx_, scores[i]);
  const __m256 mv = _mm256_set1_ps(mx_), lo = _mm256_set1_ps(-88.f);
  __m256 sumv = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    const __m256 e = exp256(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + s), mv), lo));
    _mm256_storeu_ps(scores + s, e);
    sumv = _mm256_add_ps(sumv, e);
  }
  float sum = hsum256(sumv);
  for (; s < S; ++s) {
    scores[s] = std::exp(std::max(scores[s] - mx_, -88.f));
    sum += scores[s];
  }
  if (masked && mx_ > kMasked) sum = zero_masked(scores, m, ms, S);
  __m256 acc[32];
  for (int j = 0; j < V; ++j) acc[j] = _mm256_setzero_ps();
  for (s = 0; s < S; ++s) {
    const __m256 p = _mm256_set1_ps(scores[s]);
    const float* vr = v + s * vs;
    for (int j = 0; j < V; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * j), acc[j]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int j = 0; j < V; ++j) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(acc[j], inv));
}
#endif

}  // namespace

bool decode_attention_supported() {
  return cpu_simd() >= 1;
}

void DecodeAttention::eval_cpu(const std::vector<array>& inputs, array& out) {
  auto& encoder = cpu::get_command_encoder(stream());
  for (const array& a : inputs) encoder.set_input_array(a);
  out.set_data(allocator::malloc(out.nbytes()));
  encoder.set_output_array(out);
  std::vector<array> ins;
  for (const array& a : inputs) ins.push_back(array::unsafe_weak_copy(a));
  encoder.dispatch([ins = std::move(ins), out = array::unsafe_weak_copy(out), scale = scale_,
                    softcap = softcap_]() mutable {
#ifdef QMV_X86
    const array &q = ins[0], &k = ins[1], &v = ins[2];
    const int B = q.shape(0), H = q.shape(1), E = q.shape(3), K = k.shape(1), S = k.shape(2);
    const bool has_mask = ins.size() > 3;
    const auto &qs = q.strides(), &ks = k.strides(), &vs = v.strides();
    float* o = out.data<float>();
    split_units(B * H, static_cast<int64_t>(B) * H * S * E, [&](int lo, int hi) {
      std::vector<float> scores(S);
      for (int u = lo; u < hi; ++u) {
        const int b = u / H, h = u % H, kh = h / (H / K);
        const bool* m = nullptr;
        int64_t ms = 0;
        if (has_mask) {
          const array& mk = ins[3];
          m = mk.data<bool>() + (mk.shape(0) == 1 ? 0 : b * mk.strides()[0]);
          ms = mk.strides()[3];
        }
        (cpu_simd() == 2 ? one_head : one_head_avx2)(q.data<float>() + b * qs[0] + h * qs[1], k.data<float>() + b * ks[0] + kh * ks[1], ks[2],
                 v.data<float>() + b * vs[0] + kh * vs[1], vs[2], m, ms, S, E, scale, softcap, scores.data(),
                 o + static_cast<size_t>(u) * E);
      }
    });
#endif
  });
}

array decode_attention(const array& q, const array& k, const array& v, const std::optional<array>& mask,
                       float scale, float softcap, StreamOrDevice s) {
  if (!decode_attention_supported()) throw std::invalid_argument("[decode_attention] needs AVX2 or AVX-512");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(2) != 1) {
    throw std::invalid_argument("[decode_attention] q [B, H, 1, E], k / v [B, K, S, E]");
  }
  const int B = q.shape(0), H = q.shape(1), E = q.shape(3), K = k.shape(1);
  if (k.shape() != v.shape() || k.shape(0) != B || k.shape(3) != E || K < 1 || H % K != 0 || E % 16 != 0 ||
      E > 256 || k.shape(2) < 1) {
    throw std::invalid_argument("[decode_attention] shapes: H a multiple of K, E a multiple of 16 up to 256");
  }
  if (q.dtype() != float32 || k.dtype() != float32 || v.dtype() != float32) {
    throw std::invalid_argument("[decode_attention] q, k, v float32");
  }
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[decode_attention] CPU streams only");
  // the kernels read rows of E floats: q whole, k and v rows with their last stride 1
  std::vector<array> inputs{contiguous(q, false, stream), k, v};
  for (size_t i = 1; i < 3; ++i) {
    if (inputs[i].strides().back() != 1) inputs[i] = contiguous(inputs[i], false, stream);
  }
  if (mask) {
    const array& m = *mask;
    if (m.dtype() != bool_ || m.ndim() != 4 || (m.shape(0) != B && m.shape(0) != 1) || m.shape(1) != 1 || m.shape(2) != 1 ||
        m.shape(3) != k.shape(2)) {
      throw std::invalid_argument("[decode_attention] mask bool [B or 1, 1, 1, S]");
    }
    inputs.push_back(m);
  }
  return array({B, H, 1, E}, float32, std::make_shared<DecodeAttention>(stream, scale, softcap), inputs);
}

}  // namespace pg_edge
