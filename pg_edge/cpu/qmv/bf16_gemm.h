// pg_edge's many-row products (prefill, SigLIP's patches) of 16-bit and quantized weights for MLX's
// CPU backend: in bfloat16 on Intel AMX tiles (amx.cpp; bf16_gemm.cpp has the layout), or where AMX
// is absent, for 16-bit and 8-bit weights, in int16 (qmm_int16.cpp).
#pragma once

#include "affine.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace pg_edge {

// Whether this CPU runs the products on AMX: AMX-TILE + AMX-BF16 + AVX512-BF16 + AVX-512 F/BW/VL, and the
// OS's permission to use the tile registers; PG_EDGE_PREFILL=float32, int8, int16 or avx512bf16 (or
// PG_EDGE_QMV_SIMD below avx512) turns them off.
bool bf16_available();
// The kernel in words: "amx"; where bf16_available() is false, "avx512bf16" where
// bf16dot_available() (qmm_bf16dot.cpp: 16-bit and 4/8-bit weights), else "int16" where
// int16_available() (qmm_int16.cpp: 16-bit weights of K a multiple of 16, 8-bit ones); or "none".
const char* bf16_kernel();

// qmm_bf16dot.cpp: whether this CPU runs it (AVX-512 F/BW/VL + AVX512-BF16; PG_EDGE_PREFILL
// float32 / off / 0 / int8 / int16 or PG_EDGE_QMV_SIMD below avx512 turn it off), and whether it
// takes a weight of K columns (16-bit floats: any K, zero-padded to a multiple of 16; affine: 4 or
// 8 bits, gs | K).
bool bf16dot_available();
bool bf16dot_applies(int K, bool affine, int gs, int bits);

// qmm_int16.cpp: its level (2: AVX-512 with AVX512-VNNI, VPDPWSSD; 1: AVX2 + F16C, VPMADDWD; 0:
// neither, or PG_EDGE_PREFILL float32 / off / 0; PG_EDGE_QMV_SIMD caps it as it caps the others),
// that level in words ("int16 on AVX512-VNNI", "int16 on AVX2", "none"), whether it may run, and
// whether it takes a weight of K columns (affine: 8 bits, gs | K; 16-bit floats: 16 | K).
int int16_level();
const char* int16_kernel();
bool int16_available();
bool int16_applies(int K, bool affine, int gs, int bits);

// x float32 [..., K] @ w.T -> float32 [..., N], w bfloat16 / float16 [N, K] (row-contiguous); x
// rounded to bfloat16, products summed in float32, on AMX; or in int16 (qmm_int16.cpp) where
// bf16_kernel() is "int16" (call when it is not "none").
mlx::core::array bf16_matmul(const mlx::core::array& x, const mlx::core::array& w,
                             mlx::core::StreamOrDevice s = {});

// x float32 [..., K] @ dequantize(w, scales, biases).T -> float32 [..., N] (MLX's affine layout,
// 4 or 8 bits), the weight dequantized to bfloat16 block by block.
mlx::core::array bf16_quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                       const mlx::core::array& scales, const mlx::core::array& biases,
                                       int group_size, int bits, mlx::core::StreamOrDevice s = {});

class Bf16Matmul : public mlx::core::Primitive {
 public:
  explicit Bf16Matmul(mlx::core::Stream stream) : mlx::core::Primitive(stream) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) override {
    throw std::runtime_error("[bf16_matmul] CPU only");
  }
  const char* name() const override {
    return "PgEdgeBf16Matmul";
  }
  bool is_equivalent(const mlx::core::Primitive&) const override {
    return true;
  }
};

class Bf16QuantizedMatmul : public AffinePrimitive {
 public:
  Bf16QuantizedMatmul(mlx::core::Stream stream, int group_size, int bits)
      : AffinePrimitive(stream, group_size, bits) {}

  void eval_cpu(const std::vector<mlx::core::array>& inputs,
                std::vector<mlx::core::array>& outputs) override;
  const char* name() const override {
    return "PgEdgeBf16QuantizedMatmul";
  }
};

}  // namespace pg_edge
