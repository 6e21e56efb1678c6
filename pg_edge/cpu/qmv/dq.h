// pg_edge's dequantization primitive for MLX's CPU backend (see dq.cpp).
#pragma once

#include "affine.h"
#include "mlx/ops.h"

namespace pg_edge {

// dequantize(w, scales, biases) -> float32 [N, K], MLX's affine layout (4 or 8 bits).
mlx::core::array dequantize(
    const mlx::core::array& w, const mlx::core::array& scales, const mlx::core::array& biases,
    int group_size, int bits, mlx::core::StreamOrDevice s = {});

class Dequantize : public AffinePrimitive {
 public:
  Dequantize(mlx::core::Stream stream, int group_size, int bits) : AffinePrimitive(stream, group_size, bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeDequantize";
  }
};

}  // namespace pg_edge
