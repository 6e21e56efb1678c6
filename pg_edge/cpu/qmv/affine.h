// The base of pg_edge's primitives on MLX's affine quantization (qmv.cpp, dq.cpp): CPU only,
// and equal when their group size and bit width are.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/primitives.h"

namespace pg_edge {

class AffinePrimitive : public mlx::core::Primitive {
 public:
  AffinePrimitive(mlx::core::Stream stream, int group_size, int bits)
      : mlx::core::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error(std::string("[") + name() + "] CPU only");
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override {
    const auto& o = static_cast<const AffinePrimitive&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 protected:
  int group_size_;
  int bits_;
};

}  // namespace pg_edge
