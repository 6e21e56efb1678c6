// pg_edge's dequantization primitive for MLX's CPU backend (see dq.cpp).
#pragma once

#include <cstdint>

#include "affine.h"
#include "mlx/ops.h"

namespace pg_edge {

// Elements [k0, k0 + kn) of row n of an affine-quantized weight w (the packed words as bytes,
// K elements a row; scales, biases [N, K / gs] of dtype sdt) as float32 into dst[kn]; k0 and kn
// multiples of gs. One thread, the SIMD level of the matvecs (amx.cpp's weight blocks use it).
void dequantize_span(const uint8_t* w, const void* scales, const void* biases, mlx::core::Dtype sdt, int K,
                     int gs, int bits, int n, int k0, int kn, float* dst);

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
