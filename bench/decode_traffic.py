"""Kernels launched and bytes read per decode token on the Mac path: pg_edge, mlx-vlm, mlx-lm.

    .venv/bin/python bench/decode_traffic.py                      # PG2 3B decoder, 224/448/896 px
    .venv/bin/python bench/decode_traffic.py --layers 2 --px 224 --ops   # + the kernels by name
    .venv/bin/python bench/decode_traffic.py --bits 4             # 4-bit weights (all three tools)
    .venv/bin/python bench/decode_traffic.py --kv-bits 8          # pg_edge with its 8-bit KV cache

What is counted. One steady-state decode step of each tool, built on the same decoder (the
PaliGemma 2 3B text config of bench/random_folder.py: real widths, vocabulary and, by
default, all 26 layers) whose KV caches hold a prefix of (px / 14)^2 image tokens + 3 prompt
tokens. Nothing is evaluated: weights and caches are lazy arrays (shapes and dtypes only),
so full depth costs no memory. pg_edge runs its own `generate_step` (its caches swapped for
pre-filled ones, `mx.async_eval` captured instead of run); mlx-lm's and mlx-vlm's steps are
the per-step bodies of their `generate_step`s (model on the cache, logits[:, -1],
log-softmax, greedy argmax) on their own model classes with the same weights.

While a step is built, every MLX call from Python (`mlx.core` functions, `mlx.core.fast`
kernels, `mx.array` operators and methods, MLX's compiled activations) is recorded with its
input and output arrays; the step's graph is the part its outputs depend on. That is the
graph Metal runs, not the CPU's: an `mx.fast` op counts as one kernel (on the CPU backend it
unfolds into a dozen primitives) and pg_edge's backend policy is forced to "native" (no CPU
variants: PG_EDGE_QMM=native, what Metal and CUDA get). A call counts as one kernel unless it
is a view (reshape, transpose, slicing with ints/slices, broadcasts, expand/squeeze, a cast
to the same dtype), which counts none. Bytes read per kernel: its array inputs (a view counts
what it spans: a slice of the cache buffer its slice, a broadcast its source), except a
gather (an embedding lookup), which reads the rows it returns, and a slice assignment (the
cache update, in place on Metal), which reads the new rows. Reads are split by origin:
weights, the KV cache, and temporaries (arrays made by the step's own kernels, e.g. a
float32 copy of the cache). The minimum is every decoder weight and the cache (every layer's
keys and values it must see, in the weights' dtype) read once.
Approximations: a reshape of a non-contiguous array (a copy on Metal) counts as a view;
a compiled (fused) function counts as one kernel; logits-sized temporaries count as read.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ["PG_EDGE_QMM"] = "native"  # the Metal/CUDA policy: no CPU variants (before pg_edge loads)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

VIEWS = {"reshape", "transpose", "swapaxes", "expand_dims", "squeeze", "flatten", "moveaxis", "broadcast_to",
         "stop_gradient", "view", "split", "unflatten", "atleast_1d", "atleast_2d", "atleast_3d", "T", "mT",
         "broadcast_arrays"}
GATHERS = {"take", "take_along_axis"}
# mlx.core functions that are not ops on arrays (never wrapped)
NOT_OPS = {"eval", "async_eval", "array", "stream", "new_stream", "default_device", "set_default_device",
           "default_stream", "set_default_stream", "compile", "disable_compile", "enable_compile", "grad",
           "value_and_grad", "vjp", "jvp", "vmap", "checkpoint", "custom_function", "export_function",
           "export_to_dot", "exporter", "import_function", "save", "savez", "savez_compressed",
           "save_safetensors", "save_gguf", "load", "synchronize", "finfo", "iinfo", "issubdtype",
           "set_cache_limit", "set_memory_limit", "set_wired_limit", "get_active_memory", "get_peak_memory",
           "get_cache_memory", "reset_peak_memory", "clear_cache", "device_info", "is_available",
           "from_fp8", "to_fp8", "dtype", "Dtype", "Device", "Stream", "DeviceType", "DtypeCategory"}
ARRAY_OPS = ["__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
             "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__matmul__",
             "__neg__", "__abs__", "__invert__", "__and__", "__rand__", "__or__", "__ror__", "__xor__",
             "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__iadd__", "__isub__", "__imul__",
             "__itruediv__", "__ipow__", "__imatmul__", "__getitem__", "__setitem__",
             "astype", "reshape", "transpose", "swapaxes", "squeeze", "flatten", "moveaxis", "sum", "max", "min",
             "mean", "exp", "log", "sqrt", "rsqrt", "square", "abs", "argmax", "argmin", "logsumexp", "prod",
             "cumsum", "split", "view", "round", "reciprocal", "var", "std", "all", "any", "sin", "cos", "log1p"]
COMPILED = ["gelu", "gelu_approx", "gelu_fast_approx", "silu", "relu", "sigmoid"]


class Tracer:
    """Records MLX calls made from Python while `on`, as a graph of nodes (see the module doc)."""

    def __init__(self):
        self.on = False
        self.depth = 0
        self.reset({})

    def reset(self, labels: dict):
        self.labels = labels          # id(array) -> "weight" | "cache" for the leaves we know
        self.cur: dict = {}           # id(array object) -> its current node
        self.nodes: list = []         # node = dict(name, kind, inputs, reads, foot, origin)
        self.keep: list = []          # every array seen (keeps ids unique while tracing)

    def node_of(self, a) -> int:
        n = self.cur.get(id(a))
        if n is None:
            origin = self.labels.get(id(a), "other")
            self.nodes.append(dict(name="leaf", kind="leaf", inputs=[], reads=[], foot=a.nbytes, origin=origin))
            n = self.cur[id(a)] = len(self.nodes) - 1
            self.keep.append(a)
        return n

    def record(self, name: str, args, kwargs, out):
        arrays = [a for a in _flat(args) + _flat(kwargs) if isinstance(a, mx.array)]
        outs = [o for o in _flat(out) if isinstance(o, mx.array)]
        if name == "__setitem__":
            outs = [args[0]]
        if not outs:
            return
        ins = [self.node_of(a) for a in arrays]
        kind, reads = "kernel", []
        if name == "__setitem__":  # slice assignment: in place, reads the new rows
            value = args[2]
            if isinstance(value, mx.array):
                vi = self.node_of(value)
                reads = [(vi, self.nodes[vi]["foot"])]
            foot, origin = self.nodes[ins[0]]["foot"], self.nodes[ins[0]]["origin"]
        elif (name in VIEWS or (name == "__getitem__" and not any(isinstance(i, mx.array) for i in _flat(args[1:])))
              or (name == "astype" and arrays and outs[0].dtype == arrays[0].dtype)):
            kind = "view"
            src = ins[0] if ins else None
            foot = min(outs[0].nbytes, self.nodes[src]["foot"]) if src is not None else 0
            origin = self.nodes[src]["origin"] if src is not None else "temp"
        elif name in GATHERS or name == "__getitem__":
            src = ins[0]
            reads = [(src, sum(o.nbytes for o in outs))] + [(i, self.nodes[i]["foot"]) for i in ins[1:]]
            foot, origin = outs[0].nbytes, "temp"
        else:
            reads = [(i, self.nodes[i]["foot"]) for i in ins]
            foot, origin = outs[0].nbytes, "temp"
        self.nodes.append(dict(name=name, kind=kind, inputs=ins, reads=reads, foot=foot, origin=origin))
        n = len(self.nodes) - 1
        for o in outs:
            self.cur[id(o)] = n
            self.keep.append(o)

    def graph_of(self, outputs) -> list:
        """The recorded nodes `outputs` depend on."""
        todo = [self.cur[id(o)] for o in outputs if id(o) in self.cur]
        seen = set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.extend(self.nodes[n]["inputs"])
            todo.extend(i for i, _ in self.nodes[n]["reads"])
        return [self.nodes[n] for n in sorted(seen)]


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _flat(v)]
    return [x]


T = Tracer()


def _wrap(name, fn):
    def traced(*args, **kwargs):
        if not T.on or T.depth:
            return fn(*args, **kwargs)
        T.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            T.depth -= 1
        T.record(name, args, kwargs, out)
        return out
    traced.__wrapped__ = fn
    return traced


def install() -> None:
    """Wrap MLX's Python entry points (once)."""
    if getattr(mx, "_traffic_installed", False):
        return
    for name in dir(mx):
        fn = getattr(mx, name)
        if name.startswith("_") or name in NOT_OPS or isinstance(fn, type) or not callable(fn):
            continue
        setattr(mx, name, _wrap(name, fn))
    for name in dir(mx.fast):
        fn = getattr(mx.fast, name)
        if not name.startswith("_") and callable(fn) and not isinstance(fn, type):
            setattr(mx.fast, name, _wrap("fast." + name, fn))
    for name in ARRAY_OPS:
        if hasattr(mx.array, name):
            setattr(mx.array, name, _wrap(name, getattr(mx.array, name)))
    for prop in ("T", "mT"):
        getter = getattr(mx.array, prop).fget
        setattr(mx.array, prop, property(_wrap(prop, getter)))
    real_compile = mx.compile

    def compile_traced(fun=None, **kwargs):  # functions compiled from now on: one fused kernel a call
        if fun is None:
            return lambda f: compile_traced(f, **kwargs)
        return _wrap("compiled." + getattr(fun, "__name__", "fn"), real_compile(fun, **kwargs))

    mx.compile = compile_traced
    for name in COMPILED:  # MLX's activations are mx.compile'd: one fused kernel each
        for mod in (nn, nn.layers.activations):
            if hasattr(mod, name):
                setattr(mod, name, _wrap("compiled." + name, getattr(nn.layers.activations, name)))
    mx._traffic_installed = True


# ------------------------------------------------------------------------------------------
# The three tools on one decoder

install()  # before pg_edge is imported: its compiled functions are made at import


def decoder_raw(px: int, layers: int | None) -> dict:
    from random_folder import config_raw

    return config_raw(f"pg2-3b-{px}", vision_layers=1, text_layers=layers)


def quantize(model, bits: int | None):
    if bits:
        nn.quantize(model, group_size=64, bits=bits)


def pg_edge_model(raw: dict, bits: int | None):
    from pg_edge import cpu
    from pg_edge.model.config import PaliGemmaConfig
    from pg_edge.model.paligemma import PaliGemmaModel

    model = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))
    model.set_dtype(mx.bfloat16)
    quantize(model.language_model, bits)
    model.eval()
    assert cpu.apply(model) == "native"  # no CPU variants: the classes Metal and CUDA run
    return model


def lm_weights(model) -> list:
    """pg_edge's decoder tensors under mlx-lm's / mlx-vlm's language-model names."""
    return [(k[len("language_model."):], v) for k, v in tree_flatten(model.parameters())
            if k.startswith("language_model.")]


def mlx_lm_model(raw: dict, weights: list, bits: int | None):
    from mlx_lm.models import gemma2

    text = raw["text_config"]
    args = gemma2.ModelArgs.from_dict(dict(text, rms_norm_eps=1e-6, rope_theta=10000.0))
    model = gemma2.Model(args)
    quantize(model, bits)
    model.load_weights(weights, strict=True)
    model.eval()
    return model


def mlx_vlm_model(raw: dict, weights: list, bits: int | None):
    from mlx_vlm.models.paligemma.config import TextConfig
    from mlx_vlm.models.paligemma.language import LanguageModel

    model = LanguageModel(TextConfig.from_dict(raw["text_config"]))
    quantize(model, bits)
    model.load_weights(weights, strict=True)
    model.eval()
    return model


def prefill(caches: list, raw: dict, tokens: int):
    """Fill each layer's cache with `tokens` lazy bf16 keys and values (what a prefill leaves)."""
    t = raw["text_config"]
    shape = (1, t["num_key_value_heads"], tokens, t["head_dim"])
    for c in caches:
        c.update_and_fetch(mx.zeros(shape, dtype=mx.bfloat16), mx.zeros(shape, dtype=mx.bfloat16))
    return caches


def cache_arrays(caches: list) -> list:
    out = []
    for c in caches:
        for a in (getattr(c, "keys", None), getattr(c, "values", None)):
            out.extend(x for x in _flat(a) if isinstance(x, mx.array))
    return out


def trace(step, model, caches, warm: int = 2):
    """Run `step()` `warm` times untraced (the caches reach their steady layout), then once
    traced; returns the graph of that step's outputs."""
    for _ in range(warm):
        step()
    labels = {id(v): "weight" for _, v in tree_flatten(model.parameters())}
    labels.update({id(a): "cache" for a in cache_arrays(caches)})
    T.reset(labels)
    T.on = True
    try:
        outputs = step()
    finally:
        T.on = False
    return T.graph_of(outputs)


def run_pg_edge(raw, bits, tokens, kv_bits=None):
    import pg_edge.generate as gen

    model = pg_edge_model(raw, bits)
    model.kv_bits = kv_bits
    caches = prefill(model.make_cache(padded=False), raw, tokens)
    captured = []
    real_async = mx.async_eval
    model.make_cache = lambda *a, **k: caches  # generate_step gets the filled caches
    mx.async_eval = lambda *arrays: captured.append(arrays)
    try:
        steps = gen.generate_step(model, mx.array([[2]]), None, max_tokens=10**6)

        def step():
            captured.clear()
            next(steps)
            return list(_flat(captured[-1]))

        step()  # the 1-token "prefill" on top of the filled caches
        return trace(step, model, caches), model
    finally:
        del model.make_cache
        mx.async_eval = real_async


def run_mlx_lm(raw, weights, bits, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    model = mlx_lm_model(raw, weights, bits)
    caches = prefill(make_prompt_cache(model), raw, tokens)
    y = mx.array([5])

    def step():  # mlx_lm.generate.generate_step's _step, greedy, no processors
        logits = model(y[None], cache=caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return [mx.argmax(logprobs, axis=-1), logprobs]

    return trace(step, model, caches)


def run_mlx_vlm(raw, weights, bits, tokens):
    from mlx_vlm.models.cache import make_prompt_cache

    model = mlx_vlm_model(raw, weights, bits)
    caches = prefill(make_prompt_cache(model), raw, tokens)
    y = mx.array([5])

    def step():  # mlx_vlm.generate.ar.generate_step's _step, greedy, no processors
        logits = model(y[None], cache=caches, logits_to_keep=1).logits[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return [mx.argmax(logprobs, axis=-1), logprobs]

    return trace(step, model, caches)


def minimum_bytes(raw: dict, weights: list, tokens: int) -> int:
    """Every decoder weight once + the keys and values each layer must see, in bf16."""
    t = raw["text_config"]
    window = t.get("sliding_window")
    seen = 0
    for i in range(t["num_hidden_layers"]):
        local = t["model_type"] == "gemma2" and i % 2 == 0  # Gemma2: even layers slide
        seen += min(tokens, window) if local and window else tokens
    cache = 2 * seen * t["num_key_value_heads"] * t["head_dim"] * 2
    return sum(v.nbytes for _, v in weights) + cache


def summarize(graph: list) -> dict:
    kernels = [n for n in graph if n["kind"] == "kernel"]
    by = Counter()
    for n in kernels:
        for i, b in n["reads"]:
            origin = T.nodes[i]["origin"]
            by[origin if origin in ("weight", "cache") else "temp"] += b
    return {"kernels": len(kernels), "read": sum(by.values()), "weight": by["weight"], "cache": by["cache"],
            "temp": by["temp"], "names": Counter(n["name"] for n in kernels)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--px", type=int, nargs="+", default=[224, 448, 896])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 26)")
    ap.add_argument("--prompt-tokens", type=int, default=3)
    ap.add_argument("--bits", type=int, default=None, help="quantize every tool's decoder (4 or 8)")
    ap.add_argument("--kv-bits", type=int, default=None, help="pg_edge's quantized KV cache")
    ap.add_argument("--tools", nargs="+", default=["pg_edge", "mlx_lm", "mlx_vlm"])
    ap.add_argument("--ops", action="store_true", help="list each tool's kernels by name")
    a = ap.parse_args()
    print(f"decode step, Metal path (PG_EDGE_QMM=native), PaliGemma 2 3B decoder, "
          f"{a.layers or 26} layers, weights {a.bits or 16}-bit" + (f", pg_edge KV {a.kv_bits}-bit" if a.kv_bits else ""))
    print("| px | prefix tokens | tool | kernels | read GB | weights GB | KV cache GB | temporaries GB "
          "| minimum GB | read / minimum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    listing = []
    for px in a.px:
        raw = decoder_raw(px, a.layers)
        tokens = (px // 14) ** 2 + a.prompt_tokens
        graphs = {}
        g, base = run_pg_edge(raw, a.bits, tokens, a.kv_bits)  # its weights are the peers' too
        if "pg_edge" in a.tools:
            graphs["pg_edge"] = summarize(g)
        weights = lm_weights(base)
        if "mlx_lm" in a.tools:
            graphs["mlx_lm"] = summarize(run_mlx_lm(raw, weights, a.bits, tokens))
        if "mlx_vlm" in a.tools:
            graphs["mlx_vlm"] = summarize(run_mlx_vlm(raw, weights, a.bits, tokens))
        low = minimum_bytes(raw, weights, tokens)
        for tool, s in graphs.items():
            print(f"| {px} | {tokens} | {tool} | {s['kernels']} | {s['read'] / 1e9:.3f} | {s['weight'] / 1e9:.3f} | "
                  f"{s['cache'] / 1e9:.3f} | {s['temp'] / 1e9:.3f} | {low / 1e9:.3f} | {s['read'] / low:.3f} |")
            listing.append((px, tool, s["names"]))
    if a.ops:
        for px, tool, names in listing:
            print(f"\n{tool} at {px} px: " + ", ".join(f"{k} x{v}" for k, v in names.most_common()))


if __name__ == "__main__":
    main()
