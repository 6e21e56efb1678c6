// pg_edge's 16-bit float matrix-vector product primitive (see fmv.cpp for the layout and maths).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// x [..., K] @ w.T -> [..., N] for w bfloat16 / float16 [N, K], accumulated in float32.
mlx::core::array float_matvec(const mlx::core::array& x, const mlx::core::array& w,
                              mlx::core::StreamOrDevice s = {});

class FloatMatvec : public mlx::core::Primitive {
 public:
  explicit FloatMatvec(mlx::core::Stream stream) : mlx::core::Primitive(stream) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeFloatMatvec";
  }
  bool is_equivalent(const mlx::core::Primitive&) const override {
    return true;
  }
};

}  // namespace pg_edge
