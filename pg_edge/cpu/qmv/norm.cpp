// pg_edge's RMSNorm with the residual add around it, for MLX's CPU backend: a custom primitive.
//
// A Gemma2 decoder layer normalises four times and adds two residuals per token. MLX's CPU
// backend runs each norm as three scheduled kernels (square, sum, the fused rest), so a decode
// step spent more time scheduling those fourteen small ops than computing them
// (docs/performance.md, "Norms and residual adds in one call"). Here one call does a residual
// add and the norms on either side of it:
//   h = x + (norm(y; w_y) if w_y else y),   n = norm(h or x; w_n)
//   norm(v; w) = round_v(v * rsqrt(mean(v^2) + eps)) * round_w(1 + w)   (rounded to its dtype)
// with the roundings of pg_edge.cpu.ops.rms_norm's graph (float32 inside, each step rounded to the
// dtype MLX's op would give it), so the results differ from that graph only in the order of the
// sum of squares. Rows are split over the pool when there are many.
#include "norm.h"

#include <cmath>
#include <stdexcept>

#include "common.h"
#include "pool.h"

#include "mlx/backend/cpu/encoder.h"

namespace pg_edge {

using namespace mlx::core;

namespace {

// f rounded to dtype t (float32: itself), as MLX's astype / arithmetic in t would store it.
inline float round_as(Dtype t, float f) {
  if (t == bfloat16) return static_cast<float>(static_cast<bfloat16_t>(f));
  if (t == float16) return static_cast<float>(static_cast<float16_t>(f));
  return f;
}

// out[k] = round_o(round_v(v[k] * rsqrt(mean(v^2) + eps)) * w1[k]); v [D] already in v's dtype.
void norm_row(const float* v, Dtype vt, const float* w1, Dtype ot, int D, float eps, float* out) {
  float acc[8] = {};
  int k = 0;
  for (; k + 8 <= D; k += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += v[k + j] * v[k + j];
  }
  for (; k < D; ++k) acc[0] += v[k] * v[k];
  const float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  const float inv = 1.0f / std::sqrt(ss * (1.0f / static_cast<float>(D)) + eps);
  for (k = 0; k < D; ++k) out[k] = round_as(ot, round_as(vt, v[k] * inv) * w1[k]);
}

// round_w(1 + w) [D], as the graph's `1.0 + w` in w's dtype.
std::vector<float> offset_weight(const array& w) {
  std::vector<float> w1 = read_rows(w);
  for (float& f : w1) f = round_as(w.dtype(), 1.0f + f);
  return w1;
}

bool float_dtype(Dtype t) {
  return t == float32 || t == bfloat16 || t == float16;
}

}  // namespace

void RmsNormAdd::eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) {
  for (auto& o : outputs) o.set_data(allocator::malloc(o.nbytes()));
  auto& encoder = cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  for (auto& o : outputs) encoder.set_output_array(o);
  std::vector<array> ins, outs;
  for (const auto& a : inputs) ins.push_back(array::unsafe_weak_copy(a));
  for (const auto& o : outputs) outs.push_back(array::unsafe_weak_copy(o));
  encoder.dispatch([ins = std::move(ins), outs = std::move(outs), eps = eps_, has_y = has_y_, has_wy = has_wy_,
                    has_wn = has_wn_]() mutable {
    size_t i = 0;
    const array& x = ins[i++];
    const array* y = has_y ? &ins[i++] : nullptr;
    const array* wy = has_wy ? &ins[i++] : nullptr;
    const array* wn = has_wn ? &ins[i++] : nullptr;
    array* h = has_y ? &outs[0] : nullptr;
    array* n = has_wn ? &outs.back() : nullptr;
    const int D = x.shape(-1), M = static_cast<int>(x.size() / D);
    const std::vector<float> xs = read_rows(x);
    const std::vector<float> ys = y ? read_rows(*y) : std::vector<float>();
    const std::vector<float> w1y = wy ? offset_weight(*wy) : std::vector<float>();
    const std::vector<float> w1n = wn ? offset_weight(*wn) : std::vector<float>();
    std::vector<float> hs(h ? xs.size() : 0), ns(n ? xs.size() : 0);
    // the dtype norm(y) is rounded to: y's and w_y's promotion
    const Dtype yn = wy ? promote_types(y->dtype(), wy->dtype()) : (y ? y->dtype() : x.dtype());
    split_rows(M, static_cast<int64_t>(M) * D * 8, 1, [&](int lo, int hi) {
      std::vector<float> tmp(D);
      for (int m = lo; m < hi; ++m) {
        const size_t off = static_cast<size_t>(m) * D;
        const float* v = xs.data() + off;
        if (h != nullptr) {
          const float* b = ys.data() + off;
          if (wy != nullptr) {
            norm_row(b, y->dtype(), w1y.data(), yn, D, eps, tmp.data());
            b = tmp.data();
          }
          float* hr = hs.data() + off;
          for (int k = 0; k < D; ++k) hr[k] = round_as(h->dtype(), v[k] + b[k]);
          v = hr;
        }
        if (n != nullptr) norm_row(v, h ? h->dtype() : x.dtype(), w1n.data(), n->dtype(), D, eps, ns.data() + off);
      }
    });
    if (h != nullptr) write_out(*h, hs.data());
    if (n != nullptr) write_out(*n, ns.data());
  });
}

std::vector<array> rms_norm_add(const array& x, const std::optional<array>& y, const std::optional<array>& w_y,
                                const std::optional<array>& w_n, float eps, StreamOrDevice s) {
  if (x.ndim() < 1 || x.shape(-1) < 1) throw std::invalid_argument("[rms_norm_add] x [..., D]");
  const int D = x.shape(-1);
  if (!y && !w_n) throw std::invalid_argument("[rms_norm_add] nothing to compute: give y, w_n or both");
  if (w_y && !y) throw std::invalid_argument("[rms_norm_add] w_y normalises y: give y");
  if (y && y->shape() != x.shape()) throw std::invalid_argument("[rms_norm_add] y must have x's shape");
  for (const auto* w : {&w_y, &w_n}) {
    if (*w && ((*w)->ndim() != 1 || (*w)->shape(0) != D)) throw std::invalid_argument("[rms_norm_add] weights [D]");
  }
  std::vector<array> inputs{x};
  for (const auto* a : {&y, &w_y, &w_n}) {
    if (*a) inputs.push_back(**a);
  }
  for (const auto& a : inputs) {
    if (!float_dtype(a.dtype())) throw std::invalid_argument("[rms_norm_add] float32, bfloat16 or float16 inputs");
  }
  auto stream = to_stream(s);
  if (stream.device != Device::cpu) throw std::invalid_argument("[rms_norm_add] CPU streams only");
  std::vector<Shape> shapes;
  std::vector<Dtype> dtypes;
  Dtype v = x.dtype();
  if (y) {
    const Dtype yn = w_y ? promote_types(y->dtype(), w_y->dtype()) : y->dtype();
    v = promote_types(x.dtype(), yn);
    shapes.push_back(x.shape());
    dtypes.push_back(v);
  }
  if (w_n) {
    shapes.push_back(x.shape());
    dtypes.push_back(promote_types(v, w_n->dtype()));
  }
  return array::make_arrays(std::move(shapes), dtypes,
                            std::make_shared<RmsNormAdd>(stream, eps, y.has_value(), w_y.has_value(), w_n.has_value()),
                            inputs);
}

}  // namespace pg_edge
