"""How far a quantized KV cache (`pg_edge.load(..., kv_bits=8)`) moves the logits from the float cache.

    .venv/bin/python bench/kv_cache_agreement.py                  # the demo model, its 3 samples
    .venv/bin/python bench/kv_cache_agreement.py FOLDER --steps 200 --bits 8 4

For each sample image (the demo's own, or a plain test image for another folder) with the
prompt: a greedy generation with the float cache for `--steps` decode steps, eos ignored
(the logits of every step kept); then the same token sequence fed again (teacher forcing) with
each quantized cache, so every step compares the logits of the same context. Prints, per cache:
top-1 agreement (same argmax), the max absolute logit error, the same over the logits' range
(max - min of the float logits at that step), and the mean KL(float || quantized), over all
steps of all samples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402



def run(model, ids, feats, bits, steps, forced=None):
    """Logits float32[steps + 1, V] of a greedy run (or of `forced` tokens) with a `bits` cache."""
    model.kv_bits = bits
    cache = model.make_cache(padded=False)
    logits = model(ids, image_features=feats, cache=cache, last_only=True)[:, -1].astype(mx.float32)
    out, tokens = [logits], []
    offset = ids.shape[1]
    for n in range(steps):
        tok = mx.argmax(logits, axis=-1) if forced is None else mx.array([forced[n]])
        tokens.append(int(tok.item()))
        logits = model.step(tok[:, None], None, offset, cache)[:, -1].astype(mx.float32)
        offset += 1
        mx.eval(logits)
        out.append(logits)
    return np.concatenate([np.array(x) for x in out]), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default="demo")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--prompt", default=None)
    a = ap.parse_args()
    pg = pg_edge.load(a.folder)
    model = pg.model
    limit = pg.config.real_vocab_size
    if a.folder == "demo":
        from pg_edge.demo import SAMPLES
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in SAMPLES]
        prompt = a.prompt or "caption en"
    else:
        from pg_edge.benchmark import bench_image

        images = [bench_image(pg.config.vision.image_size)]
        prompt = a.prompt or "caption en"
    stats = {b: dict(agree=0, n=0, err=0.0, rel=0.0, kl=[]) for b in a.bits}
    for image in images:
        inp = pg.prepare([image], [prompt])
        ids = mx.array(inp.input_ids)
        feats = pg.image_features(inp.pixel_values)
        ref, tokens = run(model, ids, feats, None, a.steps)
        ref = ref[:, :limit]
        for b in a.bits:
            got, _ = run(model, ids, feats, b, a.steps, forced=tokens)
            got = got[:, :limit]
            s = stats[b]
            s["agree"] += int((ref.argmax(-1) == got.argmax(-1)).sum())
            s["n"] += ref.shape[0]
            err = np.abs(ref - got).max(-1)
            s["err"] = max(s["err"], float(err.max()))
            s["rel"] = max(s["rel"], float((err / (ref.max(-1) - ref.min(-1))).max()))
            lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
            lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
            s["kl"].append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
    model.kv_bits = None
    print(f"{a.folder}: {len(images)} image(s) x {a.steps + 1} positions, prompt {prompt!r}, "
          f"float cache {model.embed_text(mx.array([[2]])).dtype}, "
          f"device {mx.default_device()}")
    print("| KV cache | positions | top-1 agreement | max abs logit error | max error / logit range | mean KL |")
    print("|---|---|---|---|---|---|")
    for b, s in stats.items():
        print(f"| {b}-bit | {s['n']} | {s['agree'] / s['n']:.3f} | {s['err']:.4f} | {s['rel']:.2%} | "
              f"{np.mean(s['kl']):.1e} |")


if __name__ == "__main__":
    main()
