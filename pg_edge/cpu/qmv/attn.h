// pg_edge's decode attention for MLX's CPU backend: one query token per row against its KV cache
// (see attn.cpp).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// q float32 [B, H, 1, E]; k, v float32 [B, K, S, E] (any strides whose last is 1: the KV cache's
// slices); mask None or bool [B, 1, 1, S] (broadcast strides allowed). Query head h reads kv
// head h / (H / K). -> float32 [B, H, 1, E]:
//   softmax(cap(scale * q . k_s), masked scores at the float32 minimum) . v
// with cap(x) = softcap * tanh(x / softcap) when softcap > 0. AVX-512 or AVX2 + FMA
// (decode_attention_supported).
mlx::core::array decode_attention(const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
                                  const std::optional<mlx::core::array>& mask, float scale, float softcap,
                                  mlx::core::StreamOrDevice s = {});
bool decode_attention_supported();

class DecodeAttention : public mlx::core::UnaryPrimitive {
 public:
  DecodeAttention(mlx::core::Stream stream, float scale, float softcap)
      : mlx::core::UnaryPrimitive(stream), scale_(scale), softcap_(softcap) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs, mlx::core::array& out) override;
  void eval_gpu(const std::vector<mlx::core::array>&, mlx::core::array&) override {
    throw std::runtime_error("[decode_attention] CPU only");
  }
  const char* name() const override {
    return "PgEdgeDecodeAttention";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override {
    const auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && softcap_ == o.softcap_;
  }

 private:
  float scale_, softcap_;
};

}  // namespace pg_edge
