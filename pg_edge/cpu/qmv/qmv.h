// pg_edge's quantized matrix-vector product primitive (see qmv.cpp for the layout and maths).
#pragma once

#include "affine.h"
#include "mlx/ops.h"

namespace pg_edge {

// x [..., K] @ dequantize(w, scales, biases).T -> [..., N], MLX's affine quantization. `int8`:
// whether the product may take qmv_int8.cpp's / qmm_int8.cpp's kernels (x rounded to int8; large
// 4-bit weights on AVX512-VNNI or AVX2); false keeps the float32 kernels.
mlx::core::array quantized_matvec(
    const mlx::core::array& x, const mlx::core::array& w, const mlx::core::array& scales,
    const mlx::core::array& biases, int group_size, int bits, bool int8 = true,
    mlx::core::StreamOrDevice s = {});

// Several products of one x: weights = w, scales, biases of each product in turn (the same K,
// group size and bits) -> one output per product. The result of each is the one
// quantized_matvec gives; the rows of all the weights split over the pool as one range, so a
// layer's q, k and v (or gate and up) products cost one wake-up and one ramp of the memory
// streams instead of three.
std::vector<mlx::core::array> quantized_matvecs(
    const mlx::core::array& x, const std::vector<mlx::core::array>& weights, int group_size, int bits,
    bool int8 = true, mlx::core::StreamOrDevice s = {});

// The primitive of both: inputs x, then w, scales, biases per product; one output each.
class QuantizedMatvecs : public AffinePrimitive {
 public:
  QuantizedMatvecs(mlx::core::Stream stream, int group_size, int bits, bool int8)
      : AffinePrimitive(stream, group_size, bits), int8_(int8) {}
  bool is_equivalent(const mlx::core::Primitive& other) const override {
    return AffinePrimitive::is_equivalent(other) && int8_ == static_cast<const QuantizedMatvecs&>(other).int8_;
  }

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeQuantizedMatvecs";
  }

 private:
  bool int8_;
};

}  // namespace pg_edge
