// pg_edge's dequantization for MLX's CPU backend: a custom primitive.
//
// out[n, k] = scale[n, g] * q[n, k] + bias[n, g],  g = k / group_size,  out float32 [N, K]
//
// Why: a quantized layer's prefill on the CPU dequantizes its weight piece by piece and runs the
// BLAS GEMM on it (pg_edge/cpu/products.py); MLX's CPU dequantize runs far slower than that GEMM
// (docs/performance.md, "Dense prefill: dequantization"). Layout as mx.quantize's affine packing:
// w uint32 [N, K * bits / 32], element k of a row at bits (k % (32 / bits)) * bits of word
// k / (32 / bits) (so byte j of a 4-bit word holds elements 2j in its low and 2j + 1 in its high
// nibble); scales and biases [N, K / group_size] (float32 / bfloat16 / float16); all
// row-contiguous. One thread per call: the caller splits a product's rows over its CPU streams.
// AVX-512 (16 elements a step), else AVX2 (8), else plain C++: common.h's cpu_simd(), the
// level the matvecs run (PG_EDGE_QMV_SIMD caps it).
#include "dq.h"

#include <cstdint>
#include <stdexcept>

#include "common.h"

#ifdef QMV_X86
#include <immintrin.h>
#endif

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

struct Rows {
  int N, K, gs, bits;
  const uint8_t* w;  // the packed words read as bytes (little-endian: byte j = bits 8j..8j+7)
  const void* scales;
  const void* biases;
  Dtype sdt;
  float* out;
};

// One group of `gs` elements from `src` (gs * bits / 8 bytes) into dst.
void group_portable(const uint8_t* src, int gs, int bits, float s, float b, float* dst) {
  if (bits == 8) {
    for (int i = 0; i < gs; ++i) dst[i] = s * src[i] + b;
    return;
  }
  for (int i = 0; i < gs / 2; ++i) {
    dst[2 * i] = s * (src[i] & 0x0F) + b;
    dst[2 * i + 1] = s * (src[i] >> 4) + b;
  }
}

#ifdef QMV_X86
__attribute__((target("avx2,fma"))) void group_avx2(const uint8_t* src, int gs, int bits, float s, float b,
                                                    float* dst) {
  const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
  if (bits == 8) {
    for (int i = 0; i < gs; i += 8) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
      _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(q, sv, bv));
    }
    return;
  }
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int i = 0; i < gs; i += 16) {  // 8 bytes -> 16 nibbles, in element order
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i / 2));
    const __m128i lo = _mm_and_si128(raw, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m128i q16 = _mm_unpacklo_epi8(lo, hi);
    const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q16));
    const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q16, 8)));
    _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(q0, sv, bv));
    _mm256_storeu_ps(dst + i + 8, _mm256_fmadd_ps(q1, sv, bv));
  }
}

__attribute__((target("avx512f"))) void group_avx512(const uint8_t* src, int gs, int bits, float s, float b,
                                                     float* dst) {
  const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(b);
  if (bits == 8) {
    for (int i = 0; i < gs; i += 16) {
      const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8));
      _mm512_storeu_ps(dst + i, _mm512_fmadd_ps(q, sv, bv));
    }
    return;
  }
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int i = 0; i < gs; i += 32) {  // 16 bytes -> 32 nibbles, in element order
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i / 2));
    const __m128i lo = _mm_and_si128(raw, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
    _mm512_storeu_ps(dst + i, _mm512_fmadd_ps(q0, sv, bv));
    _mm512_storeu_ps(dst + i + 16, _mm512_fmadd_ps(q1, sv, bv));
  }
}

#endif

using GroupFn = void (*)(const uint8_t*, int, int, float, float, float*);

GroupFn group_kernel() {
  GroupFn fn = group_portable;
#ifdef QMV_X86
  // the vector kernels step 16 / 32 elements: every group size (32, 64, 128) is a multiple
  if (cpu_simd() == 2) fn = group_avx512;
  else if (cpu_simd() == 1) fn = group_avx2;
#endif
  return fn;
}

void dequantize_rows(const Rows& r) {
  for (int n = 0; n < r.N; ++n) {
    dequantize_span(r.w, r.scales, r.biases, r.sdt, r.K, r.gs, r.bits, n, 0, r.K,
                    r.out + static_cast<size_t>(n) * r.K);
  }
}

}  // namespace

void dequantize_span(const uint8_t* w, const void* scales, const void* biases, Dtype sdt, int K, int gs, int bits,
                     int n, int k0, int kn, float* dst) {
  const GroupFn fn = group_kernel();
  const int groups = K / gs;
  const size_t row_bytes = static_cast<size_t>(K) * bits / 8, group_bytes = gs * bits / 8;
  const uint8_t* row = w + n * row_bytes;
  for (int g = k0 / gs; g < (k0 + kn) / gs; ++g) {
    const size_t si = static_cast<size_t>(n) * groups + g;
    fn(row + g * group_bytes, gs, bits, to_float(scales, sdt, si), to_float(biases, sdt, si), dst + (g * gs - k0));
  }
}

void Dequantize::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const array& w = inputs[0];
  const array& scales = inputs[1];
  const array& biases = inputs[2];
  array& out = outputs[0];
  for (const array* a : {&w, &scales, &biases}) {
    if (!a->flags().row_contiguous) {
      throw std::invalid_argument("[dequantize] weights, scales and biases must be row-contiguous");
    }
  }
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);
  encoder.dispatch([w = array::unsafe_weak_copy(w), scales = array::unsafe_weak_copy(scales),
                    biases = array::unsafe_weak_copy(biases), out = array::unsafe_weak_copy(out),
                    gs = group_size_, bits = bits_]() mutable {
    Rows r{static_cast<int>(out.shape(0)), static_cast<int>(out.shape(1)), gs, bits,
           reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), scales.data<void>(), biases.data<void>(),
           scales.dtype(), out.data<float>()};
    dequantize_rows(r);
  });
}

array dequantize(const array& w, const array& scales, const array& biases, int group_size, int bits,
                 StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[dequantize] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[dequantize] group_size must be 32, 64 or 128");
  }
  if (w.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2) {
    throw std::invalid_argument("[dequantize] w, scales, biases must be 2-D");
  }
  if (w.dtype() != uint32) throw std::invalid_argument("[dequantize] w must be uint32");
  const int N = w.shape(0), K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / bits);
  if (scales.shape(0) != N || scales.shape(1) != K / group_size || biases.shape() != scales.shape()) {
    throw std::invalid_argument("[dequantize] shapes of w, scales, biases do not match");
  }
  auto floating = [](Dtype t) { return t == float32 || t == bfloat16 || t == float16; };
  if (!floating(scales.dtype()) || biases.dtype() != scales.dtype()) {
    throw std::invalid_argument("[dequantize] scales, biases must be float32 / bfloat16 / float16");
  }
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[dequantize] CPU streams only");
  return array({N, K}, float32, std::make_shared<Dequantize>(stream, group_size, bits), {w, scales, biases});
}

}  // namespace pg_edge
