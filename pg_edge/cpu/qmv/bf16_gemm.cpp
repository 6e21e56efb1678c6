// pg_edge's many-row products in bfloat16 for MLX's CPU backend: custom primitives.
//
// out[m, n] = sum_k x[m, k] * w[n, k],  x float32 [M, K] rounded to bfloat16, w bfloat16 / float16
// [N, K] or MLX's affine 4/8-bit layout (dequantized to bfloat16), sums in float32, out float32.
//
// Why: prefill (a prompt's 256+ image and text tokens) and SigLIP's patches are big GEMMs; in
// float32 (OpenBLAS under MLX) this CPU runs them at ~100 GFLOP/s a core, while Intel's AMX tile
// unit multiplies bfloat16 tiles at ~3 TFLOP/s a core (amx.cpp; docs/performance.md, "Prefill on
// AMX tiles"). The weights are bfloat16 (or 4/8-bit) already; only the activations lose
// precision, to bfloat16, as they do in a bf16 model on a GPU.
//
// Here: whether this CPU runs it, x packed once per call (AMX B tiles of 16 k-pairs x 16 tokens,
// each 32-bit element a pair of bfloat16 at k = 2i, 2i + 1), the weight blocks the kernel reads
// (fill_w: bfloat16 as stored, float16 converted, 4/8-bit dequantized by dq.cpp's group kernel),
// and the output rows split over the pool.
#include "bf16_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bf16_kernels.h"
#include "dq.h"
#include "pool.h"

#ifdef QMV_BF16
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace bf16 {

#ifdef QMV_BF16

BF16_ATTR void fill_w(const Job& j, int n0, int nrows, int k0, int kn, int kcp, uint16_t* ws, float* tmp) {
  const int steps = kcp / 32, blocks = (nrows + 15) / 16;
  for (int nl = 0; nl < blocks * 16; ++nl) {
    uint16_t* base = ws + (static_cast<size_t>(nl / 16) * steps * 16 + nl % 16) * 32;
    if (nl >= nrows) {
      for (int s = 0; s < steps; ++s) _mm512_storeu_si512(base + s * 512, _mm512_setzero_si512());
      continue;
    }
    const int n = n0 + nl;
    if (j.w16 != nullptr && !j.fp16) {  // bfloat16: the bits as they are
      const uint16_t* src = j.w16 + static_cast<size_t>(n) * j.K + k0;
      for (int s = 0; s < steps; ++s) {
        const int left = kn - 32 * s;
        const __mmask32 mk = left >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << left) - 1);
        _mm512_storeu_si512(base + s * 512, _mm512_maskz_loadu_epi16(mk, src + 32 * s));
      }
      continue;
    }
    if (j.w16 != nullptr) {  // float16 -> float32 (exact) -> bfloat16
      const uint16_t* src = j.w16 + static_cast<size_t>(n) * j.K + k0;
      for (int k = 0; k < kn; k += 16) {
        const __m256i h = _mm256_maskz_loadu_epi16(first(kn - k), src + k);
        _mm512_storeu_ps(tmp + k, _mm512_cvtph_ps(h));
      }
    } else {
      dequantize_span(j.wq, j.scales, j.biases, j.sdt, j.K, j.gs, j.bits, n, k0, kn, tmp);
    }
    for (int s = 0; s < steps; ++s) {
      const int left = kn - 32 * s;
      const __m512 lo = _mm512_maskz_loadu_ps(first(left), tmp + 32 * s);
      const __m512 hi = _mm512_maskz_loadu_ps(first(left - 16), tmp + 32 * s + 16);
      _mm512_storeu_si512(base + s * 512, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

namespace {

// 32 values of row `row` of x from k (zero past K) as 16 bfloat16 pairs (32-bit lane i: k + 2i, + 1).
BF16_ATTR inline __m512 pairs_at(const float* row, int K, int k) {
  const __m512 lo = _mm512_maskz_loadu_ps(first(K - k), row + k);
  const __m512 hi = _mm512_maskz_loadu_ps(first(K - k - 16), row + k + 16);
  return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Token blocks [mb_lo, mb_hi) of x (float32 [M, K], row-contiguous) into AMX B tiles.
BF16_ATTR void pack_tiles(const float* x, const Job& j, int mb_lo, int mb_hi, uint32_t* xp) {
  const int steps = j.Kp / 32;
  for (int mb = mb_lo; mb < mb_hi; ++mb) {
    for (int t = 0; t < steps; ++t) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int m = mb * 16 + i;
        r[i] = m < j.M ? pairs_at(x + static_cast<size_t>(m) * j.K, j.K, t * 32) : _mm512_setzero_ps();
      }
      transpose16(r);  // row i: the pair (k + 2i, k + 2i + 1) of the 16 tokens
      float* dst = reinterpret_cast<float*>(xp + (static_cast<size_t>(mb) * steps + t) * 256);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + 16 * i, r[i]);
    }
  }
}

#endif  // QMV_BF16

bool detect() {
#ifdef QMV_BF16
  // int8 / int16: the integer kernels (qmm_int8.cpp, qmm_int16.cpp); avx512bf16: qmm_bf16dot.cpp
  if (env_is("PG_EDGE_PREFILL", {"float32", "off", "0", "int8", "int16", "avx512bf16"})) return false;
  if (cpu_simd() < 2) return false;  // no AVX-512 (or PG_EDGE_QMV_SIMD caps it below)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
  // Linux hands the tile registers' state out only on request (ARCH_REQ_XCOMP_PERM,
  // XFEATURE_XTILEDATA), once per process.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}

// The product of `j` in float32, one output at a time: what runs where the int16 kernel cannot
// (x holding inf / NaN, which no rounding to integers keeps; a weight it does not take).
void run_exact(const Job& j, const float* x) {
  std::vector<float> w(j.K);
  const int per = 32 / std::max(j.bits, 1);
  for (int n = 0; n < j.N; ++n) {
    if (j.w16 != nullptr) {
      load_floats(j.w16, j.fp16 ? float16 : bfloat16, static_cast<size_t>(n) * j.K, j.K, w.data());
    } else {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(j.wq) + static_cast<size_t>(n) * j.K / per;
      for (int k = 0; k < j.K; ++k) {
        const uint32_t q = (words[k / per] >> (j.bits * (k % per))) & ((1u << j.bits) - 1);
        const size_t g = static_cast<size_t>(n) * (j.K / j.gs) + k / j.gs;
        w[k] = to_float(j.scales, j.sdt, g) * static_cast<float>(q) + to_float(j.biases, j.sdt, g);
      }
    }
    for (int m = 0; m < j.M; ++m) {
      const float* xr = x + static_cast<size_t>(m) * j.K;
      float acc = 0.f;
      for (int k = 0; k < j.K; ++k) acc += xr[k] * w[k];
      j.out[static_cast<size_t>(m) * j.N + n] = acc;
    }
  }
}

// Runs the product of `j` (its x still float32 in `x`): on AMX, packs x, then the weight rows over
// the pool; elsewhere by VDPBF16PS (qmm_bf16dot.cpp) or in int16 (qmm_int16.cpp).
void run(Job j, const float* x) {
  if (!bf16_available()) {
    if (!dot_run(j, x) && !int16_run(j, x)) run_exact(j, x);
    return;
  }
#ifdef QMV_BF16
  j.Mp = (j.M + 15) / 16 * 16;
  j.Kp = (j.K + 31) / 32 * 32;
  std::vector<uint32_t> xpack(static_cast<size_t>(j.Mp) * j.Kp / 2);
  j.x = xpack.data();
  split_rows(j.Mp / 16, static_cast<int64_t>(j.M) * j.K, 1,
             [&](int lo, int hi) { pack_tiles(x, j, lo, hi, xpack.data()); });
  split_rows(j.N, static_cast<int64_t>(j.M) * j.N * j.K, 32, [&](int lo, int hi) { rows_amx(j, lo, hi); });
#else
  (void)j;
  (void)x;
  throw std::runtime_error("[bf16_matmul] not built for this CPU");
#endif
}

}  // namespace
}  // namespace bf16

namespace {

// x as float32 rows [M, K]: its own data when float32 and row-contiguous, else a copy in `keep`.
const float* x_rows(const array& x, std::vector<float>& keep) {
  if (x.dtype() == float32 && x.flags().row_contiguous) return x.data<float>();
  keep = read_rows(x);
  return keep.data();
}

void check(const array& x, int K, Stream stream) {
  if (std::string(bf16_kernel()) == "none") {
    throw std::runtime_error("[bf16_matmul] this CPU or OS runs neither AMX nor the int16 kernel (bf16_kernel())");
  }
  if (x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument("[bf16_matmul] x [..., K] does not match the weight");
  }
  if (x.dtype() != float32 && x.dtype() != bfloat16 && x.dtype() != float16) {
    throw std::invalid_argument("[bf16_matmul] x must be float32 / bfloat16 / float16");
  }
  if (stream.device != Device::cpu) throw std::invalid_argument("[bf16_matmul] CPU streams only");
}

Shape out_shape(const array& x, int N) {
  Shape s = x.shape();
  s.back() = N;
  return s;
}

// Evaluates one product on `stream`: inputs[0] is x [..., K], the rest the weight's arrays (w
// [N, ...] first); `weight` fills the job's weight fields from them once they are ready.
template <class F>
void eval_product(Stream stream, const std::vector<array>& inputs, array& out, F weight) {
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream);
  std::vector<array> in;
  for (const array& a : inputs) {
    encoder.set_input_array(a);
    in.push_back(array::unsafe_weak_copy(a));
  }
  encoder.set_output_array(out);
  encoder.dispatch([in = std::move(in), out = array::unsafe_weak_copy(out), weight]() mutable {
    const array& x = in[0];
    bf16::Job j{};
    j.K = x.shape(-1);
    j.M = static_cast<int>(x.size() / j.K);
    j.N = in[1].shape(0);
    j.out = out.data<float>();
    weight(j, in);
    std::vector<float> keep;
    bf16::run(j, x_rows(x, keep));
  });
}

}  // namespace

bool bf16_available() {
  static const bool ok = bf16::detect();
  return ok;
}

const char* bf16_kernel() {
  if (bf16_available()) return "amx";
  if (bf16dot_available()) return "avx512bf16";
  return int16_available() ? "int16" : "none";
}

void Bf16Matmul::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  eval_product(stream(), inputs, outputs[0], [](bf16::Job& j, const std::vector<array>& in) {
    j.w16 = in[1].data<uint16_t>();
    j.fp16 = in[1].dtype() == float16;
  });
}

void Bf16QuantizedMatmul::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const int gs = group_size_, bits = bits_;
  eval_product(stream(), inputs, outputs[0], [gs, bits](bf16::Job& j, const std::vector<array>& in) {
    j.wq = reinterpret_cast<const uint8_t*>(in[1].data<uint32_t>());
    j.scales = in[2].data<void>();
    j.biases = in[3].data<void>();
    j.sdt = in[2].dtype();
    j.gs = gs;
    j.bits = bits;
  });
}

array bf16_matmul(const array& x, const array& w, StreamOrDevice s) {
  if (w.ndim() != 2 || (w.dtype() != bfloat16 && w.dtype() != float16)) {
    throw std::invalid_argument("[bf16_matmul] w must be bfloat16 / float16 [N, K]");
  }
  if (!w.flags().row_contiguous) throw std::invalid_argument("[bf16_matmul] w must be row-contiguous");
  auto stream = to_stream(s);
  check(x, w.shape(1), stream);
  return array(out_shape(x, w.shape(0)), float32, std::make_shared<Bf16Matmul>(stream), {x, w});
}

array bf16_quantized_matmul(const array& x, const array& w, const array& scales, const array& biases, int group_size,
                            int bits, StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[bf16_matmul] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[bf16_matmul] group_size must be 32, 64 or 128");
  }
  if (w.ndim() != 2 || w.dtype() != uint32) {
    throw std::invalid_argument("[bf16_matmul] w must be uint32 [N, K * bits / 32]");
  }
  const int N = w.shape(0), K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / bits);
  if (scales.ndim() != 2 || scales.shape(0) != N || scales.shape(1) != K / group_size ||
      biases.shape() != scales.shape() || biases.dtype() != scales.dtype()) {
    throw std::invalid_argument("[bf16_matmul] shapes of w, scales, biases do not match");
  }
  if (scales.dtype() != float32 && scales.dtype() != bfloat16 && scales.dtype() != float16) {
    throw std::invalid_argument("[bf16_matmul] scales, biases must be float32 / bfloat16 / float16");
  }
  for (const array* a : {&w, &scales, &biases}) {
    if (!a->flags().row_contiguous) {
      throw std::invalid_argument("[bf16_matmul] w, scales, biases must be row-contiguous");
    }
  }
  auto stream = to_stream(s);
  check(x, K, stream);
  return array(out_shape(x, N), float32, std::make_shared<Bf16QuantizedMatmul>(stream, group_size, bits),
               {x, w, scales, biases});
}

}  // namespace pg_edge
