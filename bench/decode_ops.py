"""A decode step's small ops: pg_edge's compiled kernels against MLX's ops, part by part.

    python bench/decode_ops.py --folder FOLDER [--tokens 32] [--rounds 4] [--parts gelu,norms,logprobs,spin]

Needs the compiled module (`make qmv`). At decode size these ops handle one row of a few
thousand numbers, so what they cost is how MLX evaluates them, not the arithmetic. Each part:
- gelu: the MLP's tanh GELU on a decode step's one row (9216 units for PaliGemma 2 3B). MLX's
  `nn.gelu_approx` against pg_edge's kernel (qmv.gelu_tanh, act.cpp).
- norms: a decoder layer's four RMSNorms and two residual adds (Gemma2). The model class's ops
  (each norm pg_edge.cpu.ops.rms_norm's compiled graph: three kernels) against three calls of
  pg_edge's `rms_norm_add` (norm.cpp: pg_edge.cpu.layers.CpuDecoderLayer). The per-call pair
  times one residual add between two norms, x + norm(y) then norm of that, as the layer's
  middle has it.
- logprobs: a sampled step's log-probabilities over the vocabulary (Gemma2's final softcap, the
  mask of ids never emitted, the log-softmax). PaliGemmaModel.log_probs's MLX ops against
  pg_edge's `log_softmax` (logits.cpp: pg_edge.cpu.layers.CpuPaliGemmaModel). Its decode is
  sampled (temperature 0.7, mlx-lm's sampler); the other parts' decode is greedy, which leaves
  the log-probabilities unevaluated.
- spin: not an op but the wait between them. The matvecs' thread pool with its workers put to
  sleep after each product (PG_EDGE_QMV_SPIN_US=0) against polling for the next one
  (pg_edge.cpu.qmv's pool.cpp, 200 us by default); its per-call pair is one 4-bit product of
  2304 rows (a layer's o projection) evaluated alone, as the decode step meets it.

Part 1: microseconds per call at the folder's width, best of 5 x 200 calls evaluated one at a
time (as a decode step meets them). Part 2: decode tokens/s of the folder with each part's
kernel and with MLX's op instead (spin: polling against sleeping), alternately round by round
in one process (the host's drift hits both alike); the other parts keep their kernels.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from pg_edge.cpu import layers, mlp, ops, qmv  # noqa: E402
from pg_edge.generate import Sampling  # noqa: E402
from pg_edge.model.gemma import DecoderLayer  # noqa: E402
from pg_edge.model.paligemma import PaliGemmaModel  # noqa: E402


def mlx_gelu(module, x):
    """The MLP's activation by MLX's op (what the model class runs)."""
    return module.act(x)


def mlx_layer(self, x, mask, offset, cache=None):
    """The decoder layer by the model class's code (its norms: ops.rms_norm's compiled graph)."""
    return DecoderLayer.__call__(self, x, mask, offset, cache)


def _norms_pair(pg, dt):
    cfg = pg.config
    D, eps = cfg.text.hidden_size, cfg.text.rms_norm_eps
    x, y = mx.random.normal((1, 1, D)).astype(dt), mx.random.normal((1, 1, D)).astype(dt)
    w1, w2 = mx.random.normal((D,)) * 0.1, mx.random.normal((D,)) * 0.1
    mx.eval(x, y, w1, w2)
    return (lambda: ops.rms_norm(x + ops.rms_norm(y, w1, eps), w2, eps),
            lambda: qmv.module().rms_norm_add(x, y, w1, w2, eps=eps)[1])


def _gelu_pair(pg, dt):
    x = mx.random.normal((1, 1, pg.config.text.intermediate_size)).astype(dt)
    mx.eval(x)
    return (lambda: nn.gelu_approx(x)), (lambda: qmv.module().gelu_tanh(x))


def _logprobs_pair(pg, dt):
    cfg = pg.config
    x = mx.random.normal((1, cfg.text.vocab_size)) * 10
    mx.eval(x)
    cap, limit = float(cfg.text.final_logit_softcapping or 0.0), cfg.real_vocab_size
    return (lambda: PaliGemmaModel.log_probs(pg.model, x, limit)), (lambda: qmv.module().log_softmax(x, cap, limit))


def _spin_pair(pg, dt):
    """One product of 2304 rows (a layer's o projection) alone, the pool's workers asleep
    between calls against polling (each lambda sets the pool's wait first)."""
    m = qmv.module()
    layer = pg.model.language_model.model.layers[0].self_attn.o_proj
    quantized = "scales" in layer
    x = mx.random.normal((1, 1, layer.weight.shape[1] * 32 // layer.bits if quantized else layer.weight.shape[1]))
    mx.eval(x)

    def call(us):
        m.spin_microseconds(us)
        if quantized:
            return m.quantized_matvec(x, layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        return m.float_matvec(x, layer.weight)

    return (lambda: call(0)), (lambda: call(SPIN_US))


class Swap:
    """A part whose baseline is an attribute set to MLX's version (the kernel: the real one)."""

    def __init__(self, where, name, plain):
        self.where, self.name, self.plain = where, name, plain
        self.real = getattr(where, name)

    def __call__(self, on: bool) -> None:
        setattr(self.where, self.name, self.real if on else self.plain)


def _spin(on: bool) -> None:
    qmv.module().spin_microseconds(SPIN_US if on else 0)


SPIN_US = qmv.module().spin_microseconds() if qmv.module() is not None else 200
# part -> (switch(on), a per-call pair (baseline, ours) given the loaded folder and the
# activations' dtype, whether its decode samples, the two sides' names)
OPS = ("MLX's op", "kernel")
PARTS = {
    "gelu": (lambda: Swap(mlp, "cpu_activation", mlx_gelu), _gelu_pair, False, OPS),
    "norms": (lambda: Swap(layers.CpuDecoderLayer, "__call__", mlx_layer), _norms_pair, False, OPS),
    "logprobs": (lambda: Swap(layers.CpuPaliGemmaModel, "log_probs", PaliGemmaModel.log_probs), _logprobs_pair,
                 True, OPS),
    "spin": (lambda: _spin, _spin_pair, False, ("sleeping workers", "polling workers")),
}


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        mx.eval(fn())
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, help="a 16-bit or quantized folder")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    a = ap.parse_args()
    if qmv.module() is None:
        sys.exit(f"needs the compiled module: {qmv.kernel()}")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}")

    from pg_edge.benchmark import bench_image, decode_tokens

    pg = pg_edge.load(a.folder)
    image = bench_image(pg.config.vision.image_size)
    seen = []  # the activations' dtype a decode step's MLP meets
    real = mlp.cpu_activation
    mlp.cpu_activation = lambda module, x: seen.append(x.dtype) or real(module, x)
    decode_tokens(pg, image, "caption en", 8)  # warm-up
    mlp.cpu_activation = real
    act_dtype = seen[-1]
    print(f"{a.folder}: decode activations {act_dtype}; kernel {qmv.kernel()}")
    for part in parts:
        make_switch, pair, _, (base, ours) = PARTS[part]
        switch = make_switch()
        theirs_fn, ours_fn = pair(pg, act_dtype)
        x, y = per_call_us(theirs_fn), per_call_us(ours_fn)
        switch(True)
        print(f"  {part}: one decode-sized call, {base} {x:.1f} us, {ours} {y:.1f} us", flush=True)

    for part in parts:
        make_switch, _, sampled, (base, ours) = PARTS[part]
        switch = make_switch()
        sampler = Sampling(temperature=0.7).sampler() if sampled else None
        runs = {base: [], ours: []}
        for _ in range(a.rounds):
            for which in runs:
                switch(which == ours)
                runs[which].append(decode_tokens(pg, image, "caption en", a.tokens, sampler)["decode_tps"])
        switch(True)
        for which, tps in runs.items():
            print(f"decode, {part} by {which}: " + " ".join(f"{t:.2f}" for t in tps)
                  + f" tok/s (mean {statistics.mean(tps):.2f})")
        x, y = runs[base], runs[ours]
        print(f"{part}: {ours} / {base} {sum(y) / sum(x):.3f}x; rounds faster with {ours}: "
              f"{sum(q > p for p, q in zip(x, y))} of {a.rounds}", flush=True)


if __name__ == "__main__":
    main()
