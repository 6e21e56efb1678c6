"""pg_edge's optional compiled decode matvecs for MLX's CPU backend, and the choice to use them.

Decode on the CPU is one matrix-vector product per layer per token, bound by reading the
weights. MLX's CPU kernels for it, quantized and bf16/fp16 alike, run far below the memory
bandwidth (docs/performance.md); this package's two C++ primitives compute the same products
(AVX-512 or AVX2 + FMA where the CPU has them, plain C++ otherwise; output rows over one shared
pool of one thread per core, pool.cpp):
  - qmv.cpp, `quantized_matvec`: x [..., K] @ dequantize(w).T -> [..., N] for MLX's affine 4-
    and 8-bit layouts with groups of 32/64/128; `quantized_matvecs` computes several weights'
    products of one x in one call (a decode step's q, k, v and its gate, up: `products`), the
    rows of all of them split over the pool together;
  - fmv.cpp, `float_matvec`: x [..., K] @ w.T -> [..., N] for bfloat16 / float16 weights w
    [N, K], widened to float32 as they are read and summed in float32.

The same module holds a dequantization primitive (dq.cpp: the weight to float32 [N, K], one
thread, AVX-512 / AVX2 / plain C++) that a quantized layer's prefill uses before its BLAS GEMM
(MLX's CPU dequantize is slower than the GEMM it feeds), and the tanh GELU of SigLIP's and
Gemma's MLPs (act.cpp, over the pool; pg_edge/cpu/mlp.py), whose tanh MLX's CPU code
evaluates one element at a time (docs/performance.md). On an Intel CPU with AMX (AMX-BF16), the
many-row products of 16-bit and quantized weights (prefill, SigLIP's patches) run in bfloat16 on
its tile unit instead of the float32 BLAS GEMM (bf16_gemm.cpp, amx.cpp: activations rounded to
bfloat16, sums in float32; `PG_EDGE_PREFILL=float32` keeps the float32 GEMM). The decode
matvec of large 4-bit weights rounds x to int8 per group and sums in int32 (qmv_int8.cpp, on
AVX512-VNNI or AVX2: about twice the float32 kernel's speed; `PG_EDGE_DECODE=float32` keeps the
float32 kernel); without AMX the prefill products of those weights run an int8 GEMM
(qmm_int8.cpp on AVX512-VNNI, qmm_int8_avx2.cpp on AVX2), and those of 16-bit and 8-bit weights
a bfloat16 one on CPUs with AVX512-BF16 (qmm_bf16dot.cpp: AMD Zen 4/5), else an int16 one
(qmm_int16.cpp), the bf16 primitives' kernels there; `PG_EDGE_PREFILL=int8` (or `int16`) picks the
integer kernels over AMX and AVX512-BF16, `=avx512bf16` the bfloat16 one over AMX, `=float32`
turns them all off.

It is compiled only on request (`python -m pg_edge.cpu.qmv build`, `make qmv`; build.py) into a
user cache folder, and loaded if it is there. Without it (no compiler, a Mac, PG_EDGE_QMV=off)
pg_edge uses MLX's own kernels; `kernel()` says which one runs (`pg-edge bench` prints it).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import mlx.core as mx

from ...errors import PgEdgeError
from . import build as _build

# The compiled path is taken for products with at most this many rows (decode, a few
# sequences); more rows go to the dense GEMM path of the CPU backend.
MAX_ROWS = 8
GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
# Weight dtypes of the compiled float matvec (float32 weights keep MLX's BLAS sgemv).
FLOAT_WEIGHTS = (mx.bfloat16, mx.float16)
ACTIVATIONS = (mx.float32, mx.bfloat16, mx.float16)

_state: dict = {}


def disabled() -> bool:
    """PG_EDGE_QMV=off|0|no|mlx turns the compiled kernel off."""
    return os.environ.get("PG_EDGE_QMV", "").strip().lower() in ("0", "off", "no", "false", "mlx")


def module():
    """The compiled module if built for this MLX and loadable, else None (reason: `kernel()`)."""
    if "module" in _state:
        return _state["module"]
    mod, why = None, ""
    check_spin_setting()
    if disabled():
        why = "turned off by PG_EDGE_QMV"
    else:
        path = _build.module_file(_build.build_dir())
        if path is None:
            why = "not built (python -m pg_edge.cpu.qmv build)"
        else:
            try:
                spec = importlib.util.spec_from_file_location(_build.MODULE, path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                sys.modules.setdefault(_build.MODULE, mod)
            except (ImportError, OSError) as e:
                mod, why = None, f"failed to load ({e})"
    _state["module"], _state["why"] = mod, why
    return mod


def check_spin_setting() -> None:
    """PG_EDGE_QMV_SPIN_US, how long the pool's threads poll for work before sleeping (pool.cpp),
    when set: a whole number of microseconds from 0 to 100000, else a clear error (the module
    itself would read a bad value as 0)."""
    value = os.environ.get("PG_EDGE_QMV_SPIN_US")
    if value is not None and not (value.strip().isdigit() and int(value) <= 100000):
        raise PgEdgeError(f"PG_EDGE_QMV_SPIN_US must be a whole number of microseconds from 0 to 100000, got {value!r}")


def reset() -> None:
    """Forget the load decision (tests; after a build in this process)."""
    _state.clear()


def kernel() -> str:
    """Which decode matvec (quantized and bf16/fp16 weights) the CPU backend runs, in words."""
    mod = module()
    if mod is None:
        return f"mlx (pg_edge qmv {_state['why']})"
    int8 = ", int8 4-bit decode" if int8_decode() else ""
    bf16 = {"amx": ", amx prefill", "avx512bf16": ", avx512-bf16 prefill",
            "int16": ", int16 prefill"}.get(_prefill16(), "")
    return f"pg_edge qmv ({mod.simd()}{int8}{bf16}, {mod.threads()} threads)"


def int8_decode() -> bool:
    """Whether the decode matvec of 4-bit weights of 2^20+ elements rounds x to int8 per group
    and sums in int32 (qmv_int8.cpp, AVX512-VNNI or AVX2; the module built, the CPU able,
    PG_EDGE_DECODE not float32). Smaller and 8-bit weights keep the float32 kernels."""
    if "int8" not in _state:
        mod = module()
        _state["int8"] = mod is not None and mod.decode_kernel() != "float32"
    return _state["int8"]


def int8_prefill(layer, x: mx.array) -> bool:
    """Whether the many-row (prefill) product of `layer` by x runs on the module's int8 GEMM
    (qmm_int8.cpp on AVX512-VNNI, K a multiple of 128; qmm_int8_avx2.cpp on AVX2, K a multiple
    of 64): no AMX prefill, 4-bit affine weights, PG_EDGE_PREFILL not float32 / off
    (PG_EDGE_PREFILL=int8 picks it over AMX)."""
    return (_int8_gemm() is not None and not amx_prefill() and getattr(layer, "mode", "affine") == "affine"
            and layer.bits == 4 and layer.group_size in GROUP_SIZES and "biases" in layer
            and x.shape[-1] % (128 if _int8_gemm() == "AVX512-VNNI" else 64) == 0)


def _int8_gemm() -> str | None:
    """The instructions the module's int8 GEMM runs on ("AVX512-VNNI" or "AVX2"), or None when it
    may not run: not built, neither, PG_EDGE_DECODE=float32, PG_EDGE_PREFILL float32 / off."""
    if "int8_prefill" not in _state:
        mod = module()
        env = os.environ.get("PG_EDGE_PREFILL", "").lower()
        kernel = None if mod is None else mod.decode_kernel()
        _state["int8_prefill"] = (kernel.removeprefix("int8 on ") if env not in ("float32", "off", "0")
                                  and kernel in ("int8 on AVX512-VNNI", "int8 on AVX2") else None)
    return _state["int8_prefill"]


def _prefill16() -> str:
    """The module's kernel for many-row products of 16-bit (and quantized) weights: "amx"
    (bfloat16 on AMX tiles), where AMX is absent "avx512bf16" (qmm_bf16dot.cpp: VDPBF16PS, AMD Zen
    4/5) or "int16" (qmm_int16.cpp: AVX512-VNNI or AVX2), or "none" (not built, none of them,
    PG_EDGE_PREFILL float32 / off; int8 / int16 keep the integer kernels, avx512bf16 turns AMX off)."""
    if "bf16" not in _state:
        mod = module()
        _state["bf16"] = "none" if mod is None else mod.bf16_kernel()
    return _state["bf16"]


def amx_prefill() -> bool:
    """Whether many-row products of 16-bit and quantized weights run in bfloat16 on AMX tiles."""
    return _prefill16() == "amx"


def bf16_prefill(weight: mx.array | None = None, layer=None) -> bool:
    """Whether a many-row product runs on the module's bf16_matmul primitives: on AMX every
    16-bit and quantized weight; without AMX, 16-bit weights (on the int16 kernel those of K a
    multiple of 16) and 8-bit ones (4-bit weights take the int8 GEMM there). With neither
    argument: whether the primitives run here at all."""
    kind = _prefill16()
    if kind == "amx" or kind == "none":
        return kind == "amx"
    if layer is not None:
        return layer.bits == 8
    return weight is None or kind == "avx512bf16" or weight.shape[-1] % 16 == 0


def prefill_kernel() -> str:
    """Which kernel runs many-row (prefill) products of 16-bit and quantized weights, in words."""
    if amx_prefill():
        return "bfloat16 on AMX tiles (pg_edge qmv)"
    kind = _prefill16()
    int16 = ("bfloat16 on AVX512-BF16 for 16-bit and 8-bit weights, " if kind == "avx512bf16" else
             f"{module().int16_kernel()} for 16-bit and 8-bit weights, " if kind == "int16" else "")
    if _int8_gemm() is not None:
        rest = "" if int16 else ", float32 BLAS GEMM for the rest"
        return f"{int16}int8 on {_int8_gemm()} for 4-bit weights (pg_edge qmv){rest}"
    return "float32 BLAS GEMM"


def bf16_float_product(weight: mx.array, x: mx.array) -> mx.array:
    """x float32 [..., in] @ weight[out, in].T (bfloat16 / float16, row-contiguous) -> float32:
    x rounded to bf16 on AMX tiles or by AVX512-BF16, or weight and x rounded to int16 per block
    of 64 (call when `bf16_prefill(weight)`)."""
    return module().bf16_matmul(x, weight)


def bf16_quantized_product(layer, x: mx.array) -> mx.array:
    """x float32 [..., in] @ dequantize(layer).T -> float32 [..., out], in bf16 on AMX tiles or
    (8 bits) by AVX512-BF16 or in int16 (call when `bf16_prefill(layer=layer)` and
    `dequantizes(layer, ...)`)."""
    return module().bf16_quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"],
                                          layer.group_size, layer.bits)


def supports(layer, x: mx.array) -> bool:
    """Whether `layer` (QuantizedLinear / QuantizedEmbedding) times x takes the compiled kernel."""
    return (getattr(layer, "mode", "affine") == "affine" and layer.bits in BITS
            and layer.group_size in GROUP_SIZES and "biases" in layer
            and x.dtype in ACTIVATIONS
            and x.size // x.shape[-1] <= MAX_ROWS and module() is not None)


def dequantizes(layer, w: mx.array) -> bool:
    """Whether `layer`'s weight rows `w` (a piece of layer["weight"]) dequantize in the compiled
    kernel (affine 4/8 bits, groups 32/64/128, row-contiguous pieces, the module built)."""
    return (getattr(layer, "mode", "affine") == "affine" and layer.bits in BITS
            and layer.group_size in GROUP_SIZES and "biases" in layer and module() is not None)


def dequantize(layer, w: mx.array, scales: mx.array, biases: mx.array, stream=None) -> mx.array:
    """float32 [rows, in]: the rows `w` of `layer` with their scales and biases (call when
    `dequantizes`)."""
    return module().dequantize(w, scales, biases, layer.group_size, layer.bits, stream=stream)


def product(layer, x: mx.array) -> mx.array:
    """x [..., in] @ dequantize(layer).T -> [..., out] in x's dtype (call when `supports`)."""
    y = module().quantized_matvec(x, layer["weight"], layer["scales"], layer["biases"],
                                  layer.group_size, layer.bits)
    return y if y.dtype == x.dtype else y.astype(x.dtype)


def products(layers, x: mx.array) -> list[mx.array]:
    """[x [..., in] @ dequantize(layer).T for each layer] in x's dtype, in one call of the module
    (quantized_matvecs: the rows of every weight split over the pool together); the same
    numbers as `product` per layer. Call when `fusable(layers, x)`."""
    first = layers[0]
    ys = module().quantized_matvecs(x, [l[k] for l in layers for k in ("weight", "scales", "biases")],
                                    first.group_size, first.bits)
    return [y if y.dtype == x.dtype else y.astype(x.dtype) for y in ys]


def fusable(layers, x: mx.array) -> bool:
    """Whether `products(layers, x)` runs: each layer takes the compiled kernel (`supports`), all of
    one format (bits, group size, scales dtype), none with a bias."""
    first = layers[0]
    return all(supports(l, x) and l.bits == first.bits and l.group_size == first.group_size
               and l["scales"].dtype == first["scales"].dtype and "bias" not in l for l in layers)


def supports_float(weight: mx.array, x: mx.array) -> bool:
    """Whether x [..., in] @ weight[out, in].T (a 16-bit float weight) takes the compiled kernel."""
    return (weight.dtype in FLOAT_WEIGHTS and weight.ndim == 2 and x.dtype in ACTIVATIONS
            and x.size // x.shape[-1] <= MAX_ROWS and module() is not None)


def float_product(weight: mx.array, x: mx.array) -> mx.array:
    """x [..., in] @ weight.T -> [..., out] in promote(x, weight)'s dtype, like `x @ weight.T`
    (call when `supports_float`)."""
    return module().float_matvec(x, weight)


def supports_attention(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """Whether `decode_attention` runs: one float32 query token (q [B, H, 1, E]) against float32
    keys and values [B, K, S, E], E a multiple of 16 up to 256, mask None or bool, on AVX-512 or AVX2."""
    mod = module()
    return (mod is not None and q.ndim == 4 and q.shape[2] == 1 and k.ndim == 4
            and q.dtype == k.dtype == v.dtype == mx.float32 and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
            and (mask is None or mask.dtype == mx.bool_) and mod.decode_attention_supported())


def decode_attention(q: mx.array, k: mx.array, v: mx.array, mask, scale: float, softcap: float) -> mx.array:
    """softmax(cap(scale * q . k), mask) . v -> float32 [B, H, 1, E] in one kernel (attn.cpp;
    call when `supports_attention`); softcap 0: none."""
    return module().decode_attention(q, k, v, mask, float(scale), float(softcap or 0.0))
