"""Where one decode step's time goes, by ablation, for a converted folder.

    .venv/bin/python bench/profile_decode.py FOLDER [--layers 26] [--clock wall|cpu]

--clock wall (default) times what a user waits for (products split over the CPU cores count
once); cpu times the process's CPU time (steadier on a shared machine, but a product split
over two cores counts twice).

Parts timed in isolation do not add up (MLX overlaps the graph's scheduling with compute), so
each part's cost is what removing it saves: the whole generate_step per token, then the same
with the part replaced by a no-op of the same shape — the decoder layers' attention, their MLP,
the tied LM head (and with it the sampler's work over the vocabulary). `--layers N` scales the
per-layer parts to an N-layer decoder (a depth-cut folder standing for the full model).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402

from pg_edge.benchmark import bench_image  # noqa: E402
from pg_edge.generate import generate_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--layers", type=int, default=None, help="decoder depth to project to")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    a = ap.parse_args()
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    pg = pg_edge.load(a.folder)
    mx.eval(pg.model.parameters())
    inp = pg.prepare([bench_image(pg.config.vision.image_size)], ["caption en"])
    ids = mx.array(inp.input_ids)
    feats = pg.image_features(inp.pixel_values)
    lm = pg.model.language_model
    layers = lm.model.layers
    L = a.layers or len(layers)

    def step_ms():
        steps = generate_step(pg.model, ids, feats, max_tokens=a.tokens + 1)
        next(steps)[0].item()
        t = clock()
        for tok, _ in steps:
            tok.item()
        return (clock() - t) / a.tokens * 1e3

    def ablated(cls, name, fn):
        old = getattr(cls, name)
        setattr(cls, name, fn)
        try:
            step_ms()
            return min(step_ms() for _ in range(3))
        finally:
            setattr(cls, name, old)

    from pg_edge.model import gemma

    step_ms()
    whole = min(step_ms() for _ in range(3))
    V = lm.cfg.vocab_size
    measured_layers = len(layers)
    per_layer = {
        "attention (projections, rope, KV cache, softcapped scores)":
            whole - ablated(gemma.Attention, "__call__", lambda self, x, mask, offset, cache=None: x),
        # the class that runs (the CPU backend's CpuMLP overrides __call__)
        "MLP (gate, up, GELU, down)": whole - ablated(type(layers[0].mlp), "__call__", lambda self, x: x),
    }
    head = whole - ablated(gemma.LanguageModel, "logits",
                           lambda self, h, capped=True: mx.broadcast_to(h[..., :1], h.shape[:-1] + (V,)))
    parts = {f"{k} x {L} layers": v / measured_layers * L for k, v in per_layer.items()}
    parts["LM head (tied embedding matvec over 257216 rows)"] = head
    projected = whole + sum(v / measured_layers * (L - measured_layers) for v in per_layer.values())
    T = ids.shape[1]
    print(f"{a.folder}: {measured_layers} decoder layer(s), {T} prompt tokens, device {mx.default_device()}")
    print(f"generate_step, measured: {whole:.2f} ms/token ({a.clock} clock)" +
          (f"; projected to {L} layers: {projected:.2f} ms/token" if L != measured_layers else ""))
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<66} {v:8.2f} ms  {v / projected:6.1%}")
    rest = projected - sum(parts.values())
    print(f"  {'rest (norms, residuals, embedding, sampling, scheduling)':<66} {rest:8.2f} ms  {rest / projected:6.1%}")


if __name__ == "__main__":
    main()
