"""A decode step's small ops: pg_edge's compiled kernels against MLX's ops, part by part.

    python bench/decode_ops.py --folder FOLDER [--tokens 32] [--rounds 4] [--parts gelu,norms,logprobs]

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

Part 1: microseconds per call at the folder's width, best of 5 x 200 calls evaluated one at a
time (as a decode step meets them). Part 2: decode tokens/s of the folder with each part's
kernel and with MLX's op instead, alternately round by round in one process (the host's drift
hits both alike); the other parts keep their kernels.
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


# part -> (module, attribute, MLX's version, a per-call pair (MLX, kernel) given the loaded
# folder and the activations' dtype, whether its decode samples)
PARTS = {
    "gelu": (mlp, "cpu_activation", mlx_gelu, _gelu_pair, False),
    "norms": (layers.CpuDecoderLayer, "__call__", mlx_layer, _norms_pair, False),
    "logprobs": (layers.CpuPaliGemmaModel, "log_probs", PaliGemmaModel.log_probs, _logprobs_pair, True),
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
        ours, theirs = PARTS[part][3](pg, act_dtype)
        x, y = per_call_us(ours), per_call_us(theirs)
        print(f"  {part}: one decode-sized call, MLX's op {x:.1f} us, kernel {y:.1f} us", flush=True)

    for part in parts:
        where, name, plain, _, sampled = PARTS[part]
        sampler = Sampling(temperature=0.7).sampler() if sampled else None
        real = getattr(where, name)
        runs = {"MLX's op": [], "kernel": []}
        for _ in range(a.rounds):
            for which in runs:
                setattr(where, name, real if which == "kernel" else plain)
                runs[which].append(decode_tokens(pg, image, "caption en", a.tokens, sampler)["decode_tps"])
        setattr(where, name, real)
        for which, tps in runs.items():
            print(f"decode, {part} by {which}: " + " ".join(f"{t:.2f}" for t in tps)
                  + f" tok/s (mean {statistics.mean(tps):.2f})")
        x, y = runs["MLX's op"], runs["kernel"]
        print(f"{part}: kernel / MLX's op {sum(y) / sum(x):.3f}x; rounds faster with the kernel: "
              f"{sum(q > p for p, q in zip(x, y))} of {a.rounds}", flush=True)


if __name__ == "__main__":
    main()
