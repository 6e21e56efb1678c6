// pg_edge's quantized matrix-vector product primitive (see qmv.cpp for the layout and maths).
#pragma once

#include "affine.h"
#include "mlx/ops.h"

namespace pg_edge {

// x [..., K] @ dequantize(w, scales, biases).T -> [..., N], MLX's affine quantization.
mlx::core::array quantized_matvec(
    const mlx::core::array& x, const mlx::core::array& w, const mlx::core::array& scales,
    const mlx::core::array& biases, int group_size, int bits, mlx::core::StreamOrDevice s = {});

class QuantizedMatvec : public AffinePrimitive {
 public:
  QuantizedMatvec(mlx::core::Stream stream, int group_size, int bits) : AffinePrimitive(stream, group_size, bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeQuantizedMatvec";
  }
};

}  // namespace pg_edge
