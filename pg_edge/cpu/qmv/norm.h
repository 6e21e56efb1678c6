// pg_edge's RMSNorm, with the residual add around it, for MLX's CPU backend (see norm.cpp).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// Gemma's RMSNorm of rows v [..., D] with its stored weight w [D] (an offset from 1):
//   norm(v) = (v * rsqrt(mean(v^2) + eps)) in v's dtype, times (1 + w) in w's dtype, in the two
// dtypes' promotion (the steps of pg_edge.cpu.ops.rms_norm, float32 inside).
//
// rms_norm_add(x, y, w_y, w_n, eps) computes, rows of D, in one call:
//   h = x + (norm(y; w_y) if w_y else y)     when y is given   (a residual add)
//   n = norm(h or x; w_n)                     when w_n is given (the next norm)
// and returns [h, n], [h] or [n] (those computed, in that order). x, y float32 / bfloat16 /
// float16 of the same shape; w_y, w_n [D] of those dtypes. Outputs row-contiguous, each in MLX's
// promotion of its operands' dtypes, as the model's ops give.
std::vector<mlx::core::array> rms_norm_add(const mlx::core::array& x, const std::optional<mlx::core::array>& y,
                                           const std::optional<mlx::core::array>& w_y,
                                           const std::optional<mlx::core::array>& w_n, float eps,
                                           mlx::core::StreamOrDevice s = {});

class RmsNormAdd : public mlx::core::Primitive {
 public:
  RmsNormAdd(mlx::core::Stream stream, float eps, bool has_y, bool has_wy, bool has_wn)
      : mlx::core::Primitive(stream), eps_(eps), has_y_(has_y), has_wy_(has_wy), has_wn_(has_wn) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error("[rms_norm_add] CPU only");
  }
  const char* name() const override {
    return "PgEdgeRmsNormAdd";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override {
    const auto& o = static_cast<const RmsNormAdd&>(other);
    return eps_ == o.eps_ && has_y_ == o.has_y_ && has_wy_ == o.has_wy_ && has_wn_ == o.has_wn_;
  }

 private:
  float eps_;
  bool has_y_, has_wy_, has_wn_;
};

}  // namespace pg_edge
