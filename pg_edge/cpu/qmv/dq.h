// pg_edge's dequantization primitive for MLX's CPU backend (see dq.cpp).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// dequantize(w, scales, biases) -> float32 [N, K], MLX's affine layout (4 or 8 bits).
mlx::core::array dequantize(
    const mlx::core::array& w, const mlx::core::array& scales, const mlx::core::array& biases,
    int group_size, int bits, mlx::core::StreamOrDevice s = {});

class Dequantize : public mlx::core::Primitive {
 public:
  Dequantize(mlx::core::Stream stream, int group_size, int bits)
      : mlx::core::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeDequantize";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

}  // namespace pg_edge
