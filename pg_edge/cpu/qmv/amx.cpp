// pg_edge's many-row products on Intel AMX: custom MLX primitives for the CPU backend.
//
// out[m, n] = sum_k x[m, k] * w[n, k],  x float32 [M, K] rounded to bfloat16, w bfloat16 / float16
// [N, K] or MLX's affine 4/8-bit layout (dequantized to bfloat16), sums in float32, out float32.
//
// Why: prefill (a prompt's 256+ image and text tokens) and SigLIP's patches are big GEMMs; in
// float32 (OpenBLAS under MLX) this CPU runs them at ~100 GFLOP/s a core, while its AMX unit
// multiplies bfloat16 tiles at ~3 TFLOP/s a core (docs/performance.md, "Prefill on AMX"). The
// weights are bfloat16 (or 4/8-bit) already; only the activations lose precision, to bfloat16,
// as they do in a bf16 model on a GPU.
//
// Tiles (TDPBF16PS C += A . B): A = 16 weight rows x 32 k (bfloat16), B = 16 k-pairs x 16 tokens
// (each 32-bit element a pair of bfloat16 at k = 2i, 2i + 1: the VNNI layout), C = 16 weight rows
// x 16 tokens in float32, transposed into out on the way out. Registers: C 0-3, A 4-5, B 6-7
// (2 x 2 blocks of 16).
//
// Blocking: x is packed once per call into B tiles ([M/16][K/32] tiles of 1 KB). The output rows
// n are split over the pool (pool.cpp); each worker takes its rows in superblocks of <= SB rows
// and K in chunks of KC: per chunk it writes the superblock's weights as A tiles into a
// per-thread buffer (converting fp16 / dequantizing on the way), then runs every 2 x 2 block of
// the superblock against every token block, the partial sums in a per-thread float32 buffer
// between chunks (the chunk's weights, x's chunk and the sums stay in the core's L2).
#include "amx.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "dq.h"
#include "pool.h"

#if defined(QMV_X86) && defined(__linux__)
#define QMV_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

constexpr int SB = 320;   // weight rows per superblock (a multiple of 32)
constexpr int KC = 1024;  // k per chunk (a multiple of 128: whole quantization groups, whole tiles)

bool detect() {
#ifdef QMV_AMX
  if (const char* env = std::getenv("PG_EDGE_AMX")) {
    const std::string v(env);
    if (v == "0" || v == "off" || v == "no" || v == "false") return false;
  }
  if (cpu_simd() < 2) return false;  // capped by PG_EDGE_QMV_SIMD, or no AVX-512
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), tile_bf16 = d & (1u << 22);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = a & (1u << 5);
  if (!tile || !tile_bf16 || !avx512_bf16) return false;
  // Linux hands the tile registers' state out only on request (ARCH_REQ_XCOMP_PERM,
  // XFEATURE_XTILEDATA), once per process.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
  return false;
#endif
}

struct Job {
  int M, N, K, Mp, Kp;    // Mp: M rounded up to 16, Kp: K rounded up to 32
  const uint32_t* xpack;  // [Mp / 16][Kp / 32] B tiles of 16 x 16 bfloat16 pairs
  const uint16_t* w16;    // bfloat16 / float16 [N, K], row-contiguous (or null: quantized)
  bool fp16;
  const uint8_t* wq;  // quantized: the packed words as bytes, with scales / biases [N, K / gs]
  const void* scales;
  const void* biases;
  Dtype sdt = float32;
  int gs, bits;
  float* out;  // [M, N]
};

#ifdef QMV_AMX

#define AMX_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// r[i] (16 rows of 16 32-bit values) := its transpose.
AMX_ATTR inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: column 4L + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[c + 8] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xdd);
  }
}

inline __mmask16 first(int n) {
  return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1));
}

// Token blocks [mb_lo, mb_hi) of x (float32 [M, K], row-contiguous) into B tiles.
AMX_ATTR void pack_x(const float* x, const Job& j, int mb_lo, int mb_hi, uint32_t* xp) {
  const int steps = j.Kp / 32;
  for (int mb = mb_lo; mb < mb_hi; ++mb) {
    for (int t = 0; t < steps; ++t) {
      const int k = t * 32;
      const __mmask16 m0 = first(j.K - k), m1 = first(j.K - k - 16);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int m = mb * 16 + i;
        if (m >= j.M) {
          r[i] = _mm512_setzero_ps();
          continue;
        }
        const float* row = x + static_cast<size_t>(m) * j.K + k;
        const __m512 lo = _mm512_maskz_loadu_ps(m0, row), hi = _mm512_maskz_loadu_ps(m1, row + 16);
        r[i] = _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // 32-bit lane i: k 2i, 2i+1
      }
      transpose16(r);  // row i: the pair (k + 2i, k + 2i + 1) of the 16 tokens
      float* dst = reinterpret_cast<float*>(xp + (static_cast<size_t>(mb) * steps + t) * 256);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + 16 * i, r[i]);
    }
  }
}

// 32 bfloat16 of one A-tile row from up to 32 float32 (the rest zero).
AMX_ATTR inline void floats_to_row(const float* src, int count, uint16_t* dst) {
  const __m512 lo = _mm512_maskz_loadu_ps(first(count), src), hi = _mm512_maskz_loadu_ps(first(count - 16), src + 16);
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Rows [n0, n0 + nrows) and k [k0, k0 + kn) of the weight as A tiles: ws[nb][s] (1 KB each, 16
// rows x 32 bfloat16), kcp = kn rounded up to 32; rows past N and k past kn are zero.
AMX_ATTR void fill_w(const Job& j, int n0, int nrows, int k0, int kn, int kcp, uint16_t* ws, float* tmp) {
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
    if (j.w16 != nullptr) {  // float16 -> float32 -> bfloat16
      const uint16_t* src = j.w16 + static_cast<size_t>(n) * j.K + k0;
      for (int k = 0; k < kn; k += 16) {
        const __m256i h = _mm256_maskz_loadu_epi16(first(kn - k), src + k);
        _mm512_storeu_ps(tmp + k, _mm512_cvtph_ps(h));
      }
    } else {
      dequantize_span(j.wq, j.scales, j.biases, j.sdt, j.K, j.gs, j.bits, n, k0, kn, tmp);
    }
    for (int s = 0; s < steps; ++s) floats_to_row(tmp + 32 * s, kn - 32 * s, base + s * 512);
  }
}

// One block of NA x NB tiles over `steps` k steps: C[i][jj] (+)= A[i] . B[jj]. a: A tiles of the
// block's first row block (the next row block `a_next` further on, each k step 512 further);
// b: B tiles of the first token block at the chunk's first step (the next `b_next` further, each
// k step 256 further); c[i * 2 + jj]: the sums (zero: start from zero, not from c).
template <int NA, int NB>
AMX_ATTR void block(const uint16_t* a, size_t a_next, const uint32_t* b, size_t b_next, int steps, float* const* c,
                    bool zero) {
  if (zero) {
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (NA > 1) _tile_zero(2);
    if constexpr (NA > 1 && NB > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c[0], 64);
    if constexpr (NB > 1) _tile_loadd(1, c[1], 64);
    if constexpr (NA > 1) _tile_loadd(2, c[2], 64);
    if constexpr (NA > 1 && NB > 1) _tile_loadd(3, c[3], 64);
  }
  for (int s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * 512, 64);
    if constexpr (NA > 1) _tile_loadd(5, a + a_next + s * 512, 64);
    _tile_loadd(6, b + s * 256, 64);
    if constexpr (NB > 1) _tile_loadd(7, b + b_next + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c[0], 64);
  if constexpr (NB > 1) _tile_stored(1, c[1], 64);
  if constexpr (NA > 1) _tile_stored(2, c[2], 64);
  if constexpr (NA > 1 && NB > 1) _tile_stored(3, c[3], 64);
}

// The sums of one superblock (acc[nb][mb]: 16 weight rows x 16 tokens each) into out, transposed.
// Token blocks outer: the 16 output rows a block writes stay the same over the superblock's
// columns (a row of out is N * 4 bytes long: walking all rows per column block missed the TLB).
AMX_ATTR void write_out_tiles(const Job& j, int n0, int nrows, const float* acc) {
  const int blocks = (nrows + 15) / 16, mbs = j.Mp / 16;
  for (int mb = 0; mb < mbs; ++mb) {
    for (int nb = 0; nb < blocks; ++nb) {
      const __mmask16 mask = first(nrows - nb * 16);
      const float* tile = acc + (static_cast<size_t>(nb) * mbs + mb) * 256;
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tile + 16 * i);
      transpose16(r);  // row i: token mb * 16 + i, weight rows n0 + nb * 16 + 0..15
      for (int i = 0; i < 16 && mb * 16 + i < j.M; ++i) {
        _mm512_mask_storeu_ps(j.out + static_cast<size_t>(mb * 16 + i) * j.N + n0 + nb * 16, mask, r[i]);
      }
    }
  }
}

AMX_ATTR void rows(const Job& j, int lo, int hi) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int mbs = j.Mp / 16, ksteps_all = j.Kp / 32;
  thread_local std::vector<uint16_t> ws;
  thread_local std::vector<float> acc, tmp;
  ws.resize(static_cast<size_t>(SB / 16) * (KC / 32) * 512);
  acc.resize(static_cast<size_t>(SB / 16) * mbs * 256);
  tmp.resize(KC + 32);
  const size_t b_next = 256 * static_cast<size_t>(ksteps_all);
  for (int n0 = lo; n0 < hi; n0 += SB) {
    const int nrows = std::min(SB, hi - n0), blocks = (nrows + 15) / 16;
    for (int k0 = 0; k0 < j.K; k0 += KC) {
      const int kn = std::min(KC, j.K - k0), kcp = (kn + 31) / 32 * 32, steps = kcp / 32;
      fill_w(j, n0, nrows, k0, kn, kcp, ws.data(), tmp.data());
      const size_t a_next = static_cast<size_t>(steps) * 512;
      for (int nb = 0; nb < blocks; nb += 2) {
        const uint16_t* a = ws.data() + nb * a_next;
        const bool two_n = nb + 1 < blocks;
        for (int mb = 0; mb < mbs; mb += 2) {
          const bool two_m = mb + 1 < mbs;
          const uint32_t* b = j.xpack + (static_cast<size_t>(mb) * ksteps_all + k0 / 32) * 256;
          float* c[4];
          c[0] = acc.data() + (static_cast<size_t>(nb) * mbs + mb) * 256;
          c[1] = c[0] + 256;
          c[2] = c[0] + static_cast<size_t>(mbs) * 256;
          c[3] = c[2] + 256;
          const bool zero = k0 == 0;
          if (two_n && two_m) block<2, 2>(a, a_next, b, b_next, steps, c, zero);
          else if (two_n) block<2, 1>(a, a_next, b, b_next, steps, c, zero);
          else if (two_m) block<1, 2>(a, a_next, b, b_next, steps, c, zero);
          else block<1, 1>(a, a_next, b, b_next, steps, c, zero);
        }
      }
    }
    write_out_tiles(j, n0, nrows, acc.data());
  }
  _tile_release();
}

#endif  // QMV_AMX

// Runs the product of `j` (its x still float32 in `x`): packs x, then the weight rows over the pool.
void run(Job j, const float* x) {
#ifdef QMV_AMX
  j.Mp = (j.M + 15) / 16 * 16;
  j.Kp = (j.K + 31) / 32 * 32;
  std::vector<uint32_t> xpack(static_cast<size_t>(j.Mp) * j.Kp / 2);
  j.xpack = xpack.data();
  const int mbs = j.Mp / 16;
  split_rows(mbs, static_cast<int64_t>(j.M) * j.K, 1, [&](int lo, int hi) { pack_x(x, j, lo, hi, xpack.data()); });
  split_rows(j.N, static_cast<int64_t>(j.M) * j.N * j.K, 32, [&](int lo, int hi) { rows(j, lo, hi); });
#else
  (void)j;
  (void)x;
  throw std::runtime_error("[amx] not built for this CPU");
#endif
}

// x as float32 rows [M, K]: its own data when float32 and row-contiguous, else a copy in `keep`.
const float* x_rows(const array& x, std::vector<float>& keep) {
  if (x.dtype() == float32 && x.flags().row_contiguous) return x.data<float>();
  keep = read_rows(x);
  return keep.data();
}

void check(const array& x, int K, Stream stream) {
  if (!amx_available()) throw std::runtime_error("[amx] this CPU or OS does not run AMX (amx_available())");
  if (x.ndim() < 1 || x.shape(-1) != K) throw std::invalid_argument("[amx] x [..., K] does not match the weight");
  if (x.dtype() != float32 && x.dtype() != bfloat16 && x.dtype() != float16) {
    throw std::invalid_argument("[amx] x must be float32 / bfloat16 / float16");
  }
  if (stream.device != Device::cpu) throw std::invalid_argument("[amx] CPU streams only");
}

Shape out_shape(const array& x, int N) {
  Shape s = x.shape();
  s.back() = N;
  return s;
}

}  // namespace

bool amx_available() {
  static const bool ok = detect();
  return ok;
}

void AmxMatmul::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const array& x = inputs[0];
  const array& w = inputs[1];
  array& out = outputs[0];
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_output_array(out);
  encoder.dispatch([x = array::unsafe_weak_copy(x), w = array::unsafe_weak_copy(w),
                    out = array::unsafe_weak_copy(out)]() mutable {
    std::vector<float> keep;
    const int K = x.shape(-1), N = w.shape(0);
    Job j{};
    j.M = static_cast<int>(x.size() / K);
    j.N = N;
    j.K = K;
    j.w16 = w.data<uint16_t>();
    j.fp16 = w.dtype() == float16;
    j.out = out.data<float>();
    run(j, x_rows(x, keep));
  });
}

void AmxQuantizedMatmul::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const array& x = inputs[0];
  array& out = outputs[0];
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  for (const array& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([x = array::unsafe_weak_copy(x), w = array::unsafe_weak_copy(inputs[1]),
                    scales = array::unsafe_weak_copy(inputs[2]), biases = array::unsafe_weak_copy(inputs[3]),
                    out = array::unsafe_weak_copy(out), gs = group_size_, bits = bits_]() mutable {
    std::vector<float> keep;
    const int K = x.shape(-1);
    Job j{};
    j.M = static_cast<int>(x.size() / K);
    j.N = w.shape(0);
    j.K = K;
    j.wq = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
    j.scales = scales.data<void>();
    j.biases = biases.data<void>();
    j.sdt = scales.dtype();
    j.gs = gs;
    j.bits = bits;
    j.out = out.data<float>();
    run(j, x_rows(x, keep));
  });
}

array amx_matmul(const array& x, const array& w, StreamOrDevice s) {
  if (w.ndim() != 2 || (w.dtype() != bfloat16 && w.dtype() != float16)) {
    throw std::invalid_argument("[amx] w must be bfloat16 / float16 [N, K]");
  }
  if (!w.flags().row_contiguous) throw std::invalid_argument("[amx] w must be row-contiguous");
  auto stream = to_stream(s);
  check(x, w.shape(1), stream);
  return array(out_shape(x, w.shape(0)), float32, std::make_shared<AmxMatmul>(stream), {x, w});
}

array amx_quantized_matmul(const array& x, const array& w, const array& scales, const array& biases, int group_size,
                           int bits, StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[amx] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[amx] group_size must be 32, 64 or 128");
  }
  if (w.ndim() != 2 || w.dtype() != uint32) throw std::invalid_argument("[amx] w must be uint32 [N, K * bits / 32]");
  const int N = w.shape(0), K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / bits);
  if (scales.ndim() != 2 || scales.shape(0) != N || scales.shape(1) != K / group_size ||
      biases.shape() != scales.shape() || biases.dtype() != scales.dtype()) {
    throw std::invalid_argument("[amx] shapes of w, scales, biases do not match");
  }
  if (scales.dtype() != float32 && scales.dtype() != bfloat16 && scales.dtype() != float16) {
    throw std::invalid_argument("[amx] scales, biases must be float32 / bfloat16 / float16");
  }
  for (const array* a : {&w, &scales, &biases}) {
    if (!a->flags().row_contiguous) throw std::invalid_argument("[amx] w, scales, biases must be row-contiguous");
  }
  auto stream = to_stream(s);
  check(x, K, stream);
  return array(out_shape(x, N), float32, std::make_shared<AmxQuantizedMatmul>(stream, group_size, bits),
               {x, w, scales, biases});
}

}  // namespace pg_edge
