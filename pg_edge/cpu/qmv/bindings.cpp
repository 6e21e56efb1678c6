// Python module _pg_edge_qmv: pg_edge.cpu.qmv loads it from its build folder when present.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "act.h"
#include "attn.h"
#include "bf16_gemm.h"
#include "common.h"
#include "dq.h"
#include "fmv.h"
#include "logits.h"
#include "norm.h"
#include "pool.h"
#include "qmv.h"
#include "qmv_int8.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_pg_edge_qmv, m) {
  m.doc() = "pg_edge's quantized and 16-bit float matrix-vector products for MLX's CPU backend";
  m.def("quantized_matvec", &pg_edge::quantized_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "int8"_a = true, "stream"_a = nb::none(),
        "x [..., K] @ dequantize(w, scales, biases).T -> [..., N] (affine, 4 or 8 bits); int8=False "
        "keeps the float32 kernels where the int8 ones (large 4-bit weights, AVX512-VNNI or AVX2) would run");
  m.def("quantized_matvecs", &pg_edge::quantized_matvecs, "x"_a, "weights"_a, "group_size"_a, "bits"_a,
        nb::kw_only(), "int8"_a = true, "stream"_a = nb::none(),
        "[x @ dequantize(w, scales, biases).T for each (w, scales, biases) in weights (a flat list)], "
        "one call: the rows of all the weights split over the pool together");
  m.def("float_matvec", &pg_edge::float_matvec, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x [..., K] @ w.T -> [..., N] for w bfloat16 / float16 [N, K], in float32");
  m.def("dequantize", &pg_edge::dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "dequantize(w, scales, biases) -> float32 [N, K] (affine, 4 or 8 bits), one thread");
  m.def("gelu_tanh", &pg_edge::gelu_tanh, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), x float32 / bfloat16, in float32");
  m.def("decode_attention", &pg_edge::decode_attention, "q"_a, "k"_a, "v"_a, "mask"_a = nb::none(), "scale"_a,
        "softcap"_a, nb::kw_only(), "stream"_a = nb::none(),
        "softmax(cap(scale * q . k), mask) . v for one query token: q [B, H, 1, E], k / v [B, K, S, E] float32");
  m.def("log_softmax", &pg_edge::log_softmax, "x"_a, "cap"_a, "limit"_a, nb::kw_only(), "stream"_a = nb::none(),
        "float32 logits [..., V] -> log-softmax of cap * tanh(x / cap) (x when cap is 0) over the ids < limit, "
        "-inf beyond");
  m.def("rms_norm_add", &pg_edge::rms_norm_add, "x"_a, "y"_a = nb::none(), "w_y"_a = nb::none(), "w_n"_a = nb::none(),
        "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Gemma's RMSNorm around a residual add, rows of D: h = x + (norm(y; w_y) if w_y else y) when y is given, "
        "n = norm(h or x; w_n) when w_n is given -> [h, n] / [h] / [n]; norm(v; w) = v * rsqrt(mean(v^2) + eps) * (1 + w)");
  m.def("decode_attention_supported", &pg_edge::decode_attention_supported, "whether this CPU runs decode_attention (AVX-512)");
  m.def("bf16_matmul", &pg_edge::bf16_matmul, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x [..., K] @ w.T -> float32 [..., N], w bfloat16 / float16 [N, K], x rounded to bfloat16 (AMX)");
  m.def("bf16_quantized_matmul", &pg_edge::bf16_quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x [..., K] @ dequantize(w, scales, biases).T -> float32 [..., N], in bfloat16 blocks");
  m.def("bf16_kernel", &pg_edge::bf16_kernel, "the kernel of bf16_matmul on this CPU: 'amx', 'avx512bf16' or 'int16' (no AMX) or 'none'");
  m.def("int16_kernel", &pg_edge::int16_kernel,
        "the int16 GEMM's instructions where AMX is absent: 'int16 on AVX512-VNNI', 'int16 on AVX2' or 'none'");
  m.def("decode_kernel", &pg_edge::decode_kernel,
        "the kernel of quantized_matvec for weights of 2^20+ elements: 'int8 on AVX512-VNNI', 'int8 on AVX2' or 'float32'");
  m.def("simd", &pg_edge::simd, "the kernel this CPU runs: 'avx512', 'avx2' or 'portable'");
  m.def("threads", &pg_edge::threads, "threads one product is split over");
  m.def("spin_microseconds", &pg_edge::spin_microseconds, "us"_a = -1,
        "how long the pool's threads poll for work before sleeping (PG_EDGE_QMV_SPIN_US, else 200); us >= 0 sets it; "
        "returns the value before");
}
