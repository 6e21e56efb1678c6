// pg_edge's many-row products on Intel AMX (see amx.cpp for the layout and the blocking).
#pragma once

#include "affine.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// Whether this CPU and OS run amx.cpp's products: AMX-TILE + AMX-BF16 + AVX512-BF16, the
// kernel's permission to use the tile registers (Linux arch_prctl), and not turned off
// (PG_EDGE_AMX=off, or PG_EDGE_QMV_SIMD below avx512).
bool amx_available();

// x float32 [..., K] @ w.T -> float32 [..., N], w bfloat16 / float16 [N, K]; x rounded to
// bfloat16, products summed in float32.
mlx::core::array amx_matmul(const mlx::core::array& x, const mlx::core::array& w,
                            mlx::core::StreamOrDevice s = {});

// x float32 [..., K] @ dequantize(w, scales, biases).T -> float32 [..., N] (MLX's affine layout,
// 4 or 8 bits), the weight dequantized to bfloat16 block by block.
mlx::core::array amx_quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                      const mlx::core::array& scales, const mlx::core::array& biases,
                                      int group_size, int bits, mlx::core::StreamOrDevice s = {});

class AmxMatmul : public mlx::core::Primitive {
 public:
  explicit AmxMatmul(mlx::core::Stream stream) : mlx::core::Primitive(stream) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error("[amx] CPU only");
  }
  const char* name() const override {
    return "PgEdgeAmxMatmul";
  }
  bool is_equivalent(const mlx::core::Primitive&) const override {
    return true;
  }
};

class AmxQuantizedMatmul : public AffinePrimitive {
 public:
  AmxQuantizedMatmul(mlx::core::Stream stream, int group_size, int bits)
      : AffinePrimitive(stream, group_size, bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeAmxQuantizedMatmul";
  }
};

}  // namespace pg_edge
