// pg_edge's tanh-approximated GELU primitive for MLX's CPU backend (see act.cpp).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) elementwise, x float32 / bfloat16
// (row-contiguous), computed in float32, the result in x's dtype.
mlx::core::array gelu_tanh(const mlx::core::array& x, mlx::core::StreamOrDevice s = {});

class GeluTanh : public mlx::core::UnaryPrimitive {
 public:
  explicit GeluTanh(mlx::core::Stream stream) : mlx::core::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;
  const char* name() const override {
    return "PgEdgeGeluTanh";
  }
  bool is_equivalent(const mlx::core::Primitive&) const override {
    return true;
  }
};

}  // namespace pg_edge
