// pg_edge's log-probabilities over the vocabulary for MLX's CPU backend (see logits.cpp).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// x float32 [..., V] raw logits -> float32 [..., V] log-probabilities, per row:
//   y_i = cap * tanh(x_i / cap) (x_i when cap == 0) for i < limit, -inf for i >= limit
//   out_i = y_i - (max(y) + log(sum_j exp(y_j - max(y))))
// A row holding NaN comes out all NaN, as MLX's logsumexp gives it.
mlx::core::array log_softmax(const mlx::core::array& x, float cap, int limit, mlx::core::StreamOrDevice s = {});

class LogSoftmax : public mlx::core::UnaryPrimitive {
 public:
  LogSoftmax(mlx::core::Stream stream, float cap, int limit)
      : mlx::core::UnaryPrimitive(stream), cap_(cap), limit_(limit) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;
  void eval_gpu(const std::vector<mlx::core::array>&, mlx::core::array&) override {
    throw std::runtime_error("[log_softmax] CPU only");
  }
  const char* name() const override {
    return "PgEdgeLogSoftmax";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override {
    const auto& o = static_cast<const LogSoftmax&>(other);
    return cap_ == o.cap_ && limit_ == o.limit_;
  }

 private:
  float cap_;
  int limit_;
};

}  // namespace pg_edge
