// The SIMD level and float conversions pg_edge's matvec primitives share (see common.h).
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace pg_edge {

using namespace mlx::core;

int cpu_simd() {
#ifdef QMV_X86
  static const int level = [] {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    // BW + VL for fmv.cpp's masked 16-bit loads: every AVX-512 CPU since Skylake-SP has them
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      best = 2;
    }
    if (const char* env = std::getenv("PG_EDGE_QMV_SIMD")) {
      if (std::strcmp(env, "portable") == 0) best = 0;
      if (std::strcmp(env, "avx2") == 0) best = std::min(best, 1);
    }
    return best;
  }();
  return level;
#else
  return 0;
#endif
}

bool cpu_f16c() {
#ifdef QMV_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") != 0;
  }();
  return has;
#else
  return false;
#endif
}

const char* simd() {
  static const char* names[] = {"portable", "avx2", "avx512"};
  return names[cpu_simd()];
}

bool env_is(const char* name, std::initializer_list<const char*> values) {
  const char* env = std::getenv(name);
  if (env == nullptr) return false;
  for (const char* v : values) {
    if (std::strcmp(env, v) == 0) return true;
  }
  return false;
}

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

std::vector<float> read_rows(const array& x) {
  const int K = x.shape(-1), M = static_cast<int>(x.size() / K);
  std::vector<float> xs(static_cast<size_t>(M) * K);
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const int nd = static_cast<int>(x.ndim());
  const int64_t kstride = strides[nd - 1];
  const void* base = x.data<void>();
  for (int m = 0; m < M; ++m) {
    int64_t off = 0, rem = m;
    for (int d = nd - 2; d >= 0; --d) {
      off += (rem % shape[d]) * strides[d];
      rem /= shape[d];
    }
    float* row = xs.data() + static_cast<size_t>(m) * K;
    if (kstride == 1) {
      load_floats(base, x.dtype(), off, K, row);
    } else {
      for (int k = 0; k < K; ++k) row[k] = to_float(base, x.dtype(), off + k * kstride);
    }
  }
  return xs;
}

void write_out(array& out, const float* src) {
  const size_t n = out.size();
  switch (out.dtype()) {
    case float32:
      std::memcpy(out.data<float>(), src, n * sizeof(float));
      break;
    case bfloat16: {
      bfloat16_t* o = out.data<bfloat16_t>();
      for (size_t i = 0; i < n; ++i) o[i] = static_cast<bfloat16_t>(src[i]);
      break;
    }
    case float16: {
      float16_t* o = out.data<float16_t>();
      for (size_t i = 0; i < n; ++i) o[i] = static_cast<float16_t>(src[i]);
      break;
    }
    default:
      throw std::invalid_argument("[qmv] unsupported output dtype");
  }
}

}  // namespace pg_edge
