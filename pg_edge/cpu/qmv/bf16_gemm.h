// pg_edge's many-row products in bfloat16 (prefill, SigLIP's patches) for MLX's CPU backend, on
// Intel AMX tiles (amx.cpp); bf16_gemm.cpp has the layout.
#pragma once

#include "affine.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// Whether this CPU runs the products: AMX-TILE + AMX-BF16 + AVX512-BF16 + AVX-512 F/BW/VL, and the
// OS's permission to use the tile registers; PG_EDGE_PREFILL=float32 or int8 (or PG_EDGE_QMV_SIMD below
// avx512) turns them off.
bool bf16_available();
// The kernel in words: "amx"; "int16" where bf16_available() is false but the CPU runs AVX2 and
// not AVX512-VNNI (int8_level() == 1: qmm_int16.cpp takes 16-bit and 8-bit weights, whose K fits
// its blocks); or "none".
const char* bf16_kernel();

// qmm_int16.cpp: whether its int16 GEMM may run (AVX2 + F16C, PG_EDGE_PREFILL not float32 / off),
// and whether it takes a weight of K columns (affine: 8 bits, gs | K; 16-bit floats: 16 | K).
bool int16_available();
bool int16_applies(int K, bool affine, int gs, int bits);

// x float32 [..., K] @ w.T -> float32 [..., N], w bfloat16 / float16 [N, K] (row-contiguous); x
// rounded to bfloat16, products summed in float32, on AMX; or in int16 (qmm_int16.cpp) where
// bf16_kernel() is "int16" (call when it is not "none").
mlx::core::array bf16_matmul(const mlx::core::array& x, const mlx::core::array& w,
                             mlx::core::StreamOrDevice s = {});

// x float32 [..., K] @ dequantize(w, scales, biases).T -> float32 [..., N] (MLX's affine layout,
// 4 or 8 bits), the weight dequantized to bfloat16 block by block.
mlx::core::array bf16_quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                       const mlx::core::array& scales, const mlx::core::array& biases,
                                       int group_size, int bits, mlx::core::StreamOrDevice s = {});

class Bf16Matmul : public mlx::core::Primitive {
 public:
  explicit Bf16Matmul(mlx::core::Stream stream) : mlx::core::Primitive(stream) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error("[bf16_matmul] CPU only");
  }
  const char* name() const override {
    return "PgEdgeBf16Matmul";
  }
  bool is_equivalent(const mlx::core::Primitive&) const override {
    return true;
  }
};

class Bf16QuantizedMatmul : public AffinePrimitive {
 public:
  Bf16QuantizedMatmul(mlx::core::Stream stream, int group_size, int bits)
      : AffinePrimitive(stream, group_size, bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeBf16QuantizedMatmul";
  }
};

}  // namespace pg_edge
