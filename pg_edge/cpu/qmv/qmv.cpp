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
// otherwise; PG_EDGE_QMV_SIMD=avx2|portable caps the choice), output rows split over a small
// pool of threads (one per core this process may use; PG_EDGE_QMV_THREADS sets it).
#include "qmv.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define QMV_X86 1
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

// ------------------------------------------------------------------ threads

namespace {

int default_threads() {
  if (const char* env = std::getenv("PG_EDGE_QMV_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return std::min(n, 64);
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, std::min(CPU_COUNT(&set), 8));
  }
#endif
  return std::max(1u, std::min(std::thread::hardware_concurrency(), 8u));
}

// A fixed pool: run(n, f) calls f(0) .. f(n - 1), spread over the workers and the caller.
// One job at a time; a caller that finds the pool busy (another MLX stream's task) runs its
// job alone on its own thread.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { loop(); });
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int n, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(job_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n <= 1) {
      for (int i = 0; i < n; ++i) f(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &f;
      n_ = n;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    for (int i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }
  void loop() {
    unsigned long seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lk(m_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_, m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, active_ = 0;
  std::atomic<int> next_{0};
  unsigned long generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool(default_threads());  // never destroyed: workers outlive exit paths
  return *p;
}

// ------------------------------------------------------------------ conversions

float to_float(const void* p, Dtype t, size_t i) {
  switch (t) {
    case float32:
      return static_cast<const float*>(p)[i];
    case bfloat16:
      return static_cast<float>(static_cast<const bfloat16_t*>(p)[i]);
    case float16:
      return static_cast<float>(static_cast<const float16_t*>(p)[i]);
    default:
      throw std::invalid_argument("[qmv] unsupported dtype");
  }
}

void store(void* p, Dtype t, size_t i, float v) {
  switch (t) {
    case float32:
      static_cast<float*>(p)[i] = v;
      break;
    case bfloat16:
      static_cast<bfloat16_t*>(p)[i] = static_cast<bfloat16_t>(v);
      break;
    case float16:
      static_cast<float16_t*>(p)[i] = static_cast<float16_t>(v);
      break;
    default:
      throw std::invalid_argument("[qmv] unsupported dtype");
  }
}

// n values from p + off, any of the three float dtypes, into dst as float32 (one type switch,
// then a loop the compiler vectorises: bfloat16 -> float32 is a 16-bit shift).
void load_floats(const void* p, Dtype t, size_t off, int n, float* dst) {
  switch (t) {
    case float32:
      std::memcpy(dst, static_cast<const float*>(p) + off, n * sizeof(float));
      break;
    case bfloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(p) + off;
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(src[i]) << 16;
      break;
    }
    default:
      for (int i = 0; i < n; ++i) dst[i] = to_float(p, t, off + i);
  }
}

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
  std::vector<float> sc(groups), bi(groups);
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = j.w + static_cast<size_t>(n) * words;
    const size_t s0 = static_cast<size_t>(n) * groups;
    load_floats(j.scales, j.sdt, s0, groups, sc.data());
    load_floats(j.biases, j.sdt, s0, groups, bi.data());
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
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(bi.data() + g), _mm256_loadu_ps(xsum + g), acc[m]);
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      float total = _mm_cvtss_f32(h);
      // the words after the last whole block (4 bits, group 32, K % 64 == 32): plain code
      const float* x = j.xs.data() + static_cast<size_t>(mm) * j.K;
      for (int wi = blocks * 8; wi < words; ++wi) {
        float dot = 0.f;
        for (int e = 0; e < PER_WORD; ++e) {
          dot += static_cast<float>((wr[wi] >> (e * BITS)) & ((1u << BITS) - 1)) * x[wi * PER_WORD + e];
        }
        total += sc[wi * PER_WORD / j.gs] * dot;
      }
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
  std::vector<float> sc(groups), bi(groups);
  for (int n = lo; n < hi; ++n) {
    const uint32_t* wr = j.w + static_cast<size_t>(n) * words;
    const size_t s0 = static_cast<size_t>(n) * groups;
    load_floats(j.scales, j.sdt, s0, groups, sc.data());
    load_floats(j.biases, j.sdt, s0, groups, bi.data());
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
          : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(load_mask, sc.data() + g0));
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(d0[m], d1[m]), sv, acc[m]);
    }
    for (int m = 0; m < MB; ++m) {
      const int mm = m0 + m;
      // the biases' term, sum_g bias[g] * sum(x_g), in the same vector before the reduction
      const float* xsum = j.xsum.data() + static_cast<size_t>(mm) * groups;
      for (int g = 0; g < groups; g += 16) {
        const __mmask16 k = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
        acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, bi.data() + g), _mm512_maskz_loadu_ps(k, xsum + g), acc[m]);
      }
      float total = _mm512_reduce_add_ps(acc[m]);
      const float* x = j.xs.data() + static_cast<size_t>(mm) * j.K;
      for (int wi = blocks * 16; wi < words; ++wi) {
        float dot = 0.f;
        for (int e = 0; e < PER_WORD; ++e) {
          dot += static_cast<float>((wr[wi] >> (e * BITS)) & ((1u << BITS) - 1)) * x[wi * PER_WORD + e];
        }
        total += sc[wi * PER_WORD / j.gs] * dot;
      }
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

int cpu_simd() {
  static const int level = [] {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f")) best = 2;
    if (const char* env = std::getenv("PG_EDGE_QMV_SIMD")) {  // cap it (tests, comparisons)
      if (std::strcmp(env, "portable") == 0) best = 0;
      if (std::strcmp(env, "avx2") == 0) best = std::min(best, 1);
    }
    return best;
  }();
  return level;
}
#else
int cpu_simd() {
  return 0;
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

// Reads x (any strides) into float32: xs [M, K] as is, xp [M, K] permuted per block of the
// vector kernel (xp[b * B + j * lanes + i] = x[b * B + i * per_word + j]), xsum.
void prepare_x(Job& j, const array& x) {
  const int per_word = 32 / j.bits, L = j.lanes, B = L * per_word, groups = j.K / j.gs;
  j.xs.resize(static_cast<size_t>(j.M) * j.K);
  j.xp.resize(j.xs.size());
  j.xsum.assign(static_cast<size_t>(j.M) * groups, 0.f);
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const int nd = static_cast<int>(x.ndim());
  const int64_t kstride = strides[nd - 1];
  const void* base = x.data<void>();
  for (int m = 0; m < j.M; ++m) {
    int64_t off = 0, rem = m;
    for (int d = nd - 2; d >= 0; --d) {
      off += (rem % shape[d]) * strides[d];
      rem /= shape[d];
    }
    float* xs = j.xs.data() + static_cast<size_t>(m) * j.K;
    for (int k = 0; k < j.K; ++k) xs[k] = to_float(base, x.dtype(), off + k * kstride);
    float* xp = j.xp.data() + static_cast<size_t>(m) * j.K;
    const int whole = j.K / B * B;  // the rest (a part block) is read from xs
    for (int k = 0; k < whole; ++k) {
      const int b = k / B, r = k % B;
      xp[b * B + (r % per_word) * L + r / per_word] = xs[k];
    }
    for (int k = 0; k < j.K; ++k) j.xsum[static_cast<size_t>(m) * groups + k / j.gs] += xs[k];
  }
}

}  // namespace

// ------------------------------------------------------------------ primitive

void QuantizedMatvec::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  const array& x = inputs[0];
  const array& w = inputs[1];
  const array& scales = inputs[2];
  const array& biases = inputs[3];
  array& out = outputs[0];
  for (const array* a : {&w, &scales, &biases}) {
    if (!a->flags().row_contiguous) {
      throw std::invalid_argument("[qmv] weights, scales and biases must be row-contiguous");
    }
  }
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);
  const int K = x.shape(-1), N = w.shape(0), M = static_cast<int>(x.size() / K);
  encoder.dispatch([x = array::unsafe_weak_copy(x), w = array::unsafe_weak_copy(w),
                    scales = array::unsafe_weak_copy(scales),
                    biases = array::unsafe_weak_copy(biases), out = array::unsafe_weak_copy(out),
                    M, N, K, gs = group_size_, bits = bits_]() mutable {
    Job j{M, N, K, gs, bits, w.data<uint32_t>(), scales.data<void>(), biases.data<void>(),
          scales.dtype(), {}, {}, {}, cpu_simd(), cpu_simd() == 2 ? 16 : 8};
    prepare_x(j, x);
    std::vector<float> tmp;
    float* res = out.dtype() == float32 ? out.data<float>() : nullptr;
    if (res == nullptr) {
      tmp.resize(static_cast<size_t>(M) * N);
      res = tmp.data();
    }
    Pool& p = pool();
    const int64_t work = static_cast<int64_t>(N) * K * M;
    int chunks = 1;
    if (p.size() > 1 && work >= (1 << 19)) {
      // a few chunks per thread: a core busy with other work takes fewer of them
      chunks = std::min(N / 8, 4 * p.size());
      chunks = std::max(chunks, 1);
    }
    const int step = (N + chunks - 1) / chunks;
    p.run(chunks, [&](int c) {
      const int lo = c * step, hi = std::min(N, lo + step);
      if (lo < hi) rows(j, lo, hi, res);
    });
    if (!tmp.empty()) {
      void* o = out.data<void>();
      for (size_t i = 0; i < tmp.size(); ++i) store(o, out.dtype(), i, tmp[i]);
    }
  });
}

void QuantizedMatvec::eval_gpu(const std::vector<array>&, std::vector<array>&) {
  throw std::runtime_error("[qmv] CPU only");
}

bool QuantizedMatvec::is_equivalent(const Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatvec&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

array quantized_matvec(const array& x, const array& w, const array& scales, const array& biases,
                       int group_size, int bits, StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[qmv] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("[qmv] group_size must be 32, 64 or 128");
  }
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
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[qmv] CPU streams only");
  Shape out_shape = x.shape();
  out_shape.back() = N;
  return array(out_shape, promote_types(x.dtype(), scales.dtype()),
               std::make_shared<QuantizedMatvec>(stream, group_size, bits), {x, w, scales, biases});
}

const char* simd() {
  static const char* names[] = {"portable", "avx2", "avx512"};
  return names[cpu_simd()];
}

int threads() {
  return pool().size();
}

}  // namespace pg_edge
