"""Seconds per step and peak memory of one QLoRA step on PaliGemma 2 3B-224 shapes.

    .venv/bin/python bench/finetune_qlora.py                        # 1 SigLIP + 1 decoder layer
    .venv/bin/python bench/finetune_qlora.py --freeze-vision --dtype bfloat16

The model is PaliGemma 2 3B-224 at its real widths (SigLIP 1152 / MLP 4304 padded to 4352 as
the quantizer pads it, Gemma2 2304 / MLP 9216, 8 heads x 256, 4 kv heads, vocabulary 257216)
with random weights, built in memory (PaliGemmaModel + nn.quantize: no files), quantized with
the project's default recipe (decoder 4-bit; vision, connector, embeddings 8-bit; group 64),
with LoRA rank 8 (pg_edge.adapters, `lora` mode) and AdamW. The batch is the issue's: one
224 px image (256 image tokens), "<bos>caption en\\n", 32 suffix tokens (eos included).

Layer counts are cut (27 SigLIP -> --vision-layers, 26 decoder -> --text-layers) so the run
fits a CPU's minutes. One step is timed at (V, T) layers, (V+1, T) and (V, T+1); the
differences give the cost of one SigLIP and one decoder layer, which extrapolate the full
model: time(27, 26) = time(V, T) + (27 - V) * per_vision + (26 - T) * per_decoder, and the
same for peak memory. Each configuration runs in a fresh process so peaks do not mix.

On the MLX CPU backend, quantized matmuls with bfloat16 activations are ~10x slower than with
float32 (measured: 2304x9216 4-bit weight, 300 rows: 46 s vs 5 s), so the default activation /
scale dtype here is float32; on Apple silicon pass --dtype bfloat16.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL_VISION, FULL_TEXT = 27, 26


def config_raw(vision_layers: int, text_layers: int) -> dict:
    """PaliGemma 2 3B-224's config.json, with the layer counts cut."""
    return {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2304,
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4352, "num_hidden_layers": vision_layers,
                          "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
        "text_config": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": text_layers, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "head_dim": 256, "vocab_size": 257216, "query_pre_attn_scalar": 256,
                        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                        "sliding_window": 4096},
    }


def build(vision_layers: int, text_layers: int, dtype_name: str):
    import mlx.core as mx
    import mlx.nn as nn

    from pg_edge.model.config import PaliGemmaConfig
    from pg_edge.model.paligemma import PaliGemmaModel

    dtype = getattr(mx, dtype_name)
    model = PaliGemmaModel(PaliGemmaConfig.from_dict(config_raw(vision_layers, text_layers)))
    model.set_dtype(dtype)

    def recipe(path: str, module) -> dict | bool:
        if not hasattr(module, "to_quantized") or "position_embedding" in path:
            return False  # the patch conv, position table and norms stay float (as quantize/ does)
        bits = 4 if path.startswith("language_model.model.layers.") else 8
        return {"group_size": 64, "bits": bits}

    nn.quantize(model, class_predicate=recipe)
    mx.eval(model.parameters())
    return model


def batch(image_tokens: int = 256, suffix: int = 32, seed: int = 0):
    import numpy as np

    from pg_edge.model.masks import suffix_mask_ar
    from pg_edge.train.data import Batch

    rng = np.random.default_rng(seed)
    prompt = [257152] * image_tokens + [2, 4, 5, 6, 108]  # <image> x 256, <bos>, "caption en", "\n"
    ids = np.array([prompt + list(rng.integers(1000, 256000, suffix - 1)) + [1]], dtype=np.int32)
    T = ids.shape[1]
    mask_ar = suffix_mask_ar(len(prompt), T - len(prompt))[None]
    pixels = rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    return Batch(ids, mask_ar, np.ones((1, T), bool), mask_ar.astype(bool), pixels, np.zeros(1, np.int64))


def measure(vision_layers: int, text_layers: int, dtype: str, freeze_vision: bool, rank: int) -> dict:
    """One process: build, one QLoRA step, timings and peak memory."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from pg_edge.train.loss import loss_inputs, weighted_loss
    from pg_edge.adapters import LoraSettings, ModeSpec, apply_mode, count_parameters

    t0 = time.perf_counter()
    model = build(vision_layers, text_layers, dtype)
    built = time.perf_counter() - t0
    mx.random.seed(0)
    trainable = apply_mode(model, ModeSpec("lora", freeze_vision, LoraSettings(rank, 2.0 * rank)))
    model.train()
    opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
    step = nn.value_and_grad(model, weighted_loss)
    inputs = loss_inputs(batch())
    weights_gb = mx.get_active_memory() / 1e9
    mx.reset_peak_memory()
    t1 = time.perf_counter()
    loss, grads = step(model, **inputs)
    opt.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    seconds = time.perf_counter() - t1
    return {"vision_layers": vision_layers, "text_layers": text_layers, "seconds_per_step": seconds,
            "peak_gb": mx.get_peak_memory() / 1e9, "weights_gb": weights_gb, "build_s": built,
            "loss": float(loss), "lora_params": count_parameters(model, trainable=True),
            "lora_tensors": len(trainable)}


def run_child(v: int, t: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(v), str(t), "--dtype", args.dtype, "--rank", str(args.rank)]
    cmd += ["--freeze-vision"] if args.freeze_vision else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--freeze-vision", action="store_true", help="no SigLIP adapters (no backward through it)")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.dtype, args.freeze_vision, args.rank)))
        return 0

    V, T = args.vision_layers, args.text_layers
    runs = {key: run_child(*key, args) for key in [(V, T), (V + 1, T), (V, T + 1)]}
    for r in runs.values():
        print(f"SigLIP {r['vision_layers']:2d} + decoder {r['text_layers']:2d} layers: "
              f"{r['seconds_per_step']:7.1f} s/step  peak {r['peak_gb']:6.2f} GB  (weights {r['weights_gb']:.2f} GB, "
              f"{r['lora_params']:,} LoRA params, loss {r['loss']:.2f})")
    base = runs[(V, T)]
    per = {}
    for name, key in (("vision", (V + 1, T)), ("decoder", (V, T + 1))):
        per[name] = {m: runs[key][m] - base[m] for m in ("seconds_per_step", "peak_gb")}
        print(f"one {name:7s} layer: {per[name]['seconds_per_step']:6.1f} s  {per[name]['peak_gb']:5.2f} GB")
    nv, nt = FULL_VISION - V, FULL_TEXT - T
    est = {m: base[m] + nv * per["vision"][m] + nt * per["decoder"][m] for m in ("seconds_per_step", "peak_gb")}
    print(f"extrapolated PaliGemma 2 3B-224 (27 + 26 layers), QLoRA rank {args.rank}, batch 1, "
          f"{'vision frozen' if args.freeze_vision else 'vision adapters'}, {args.dtype}: "
          f"{est['seconds_per_step']:.0f} s/step, peak {est['peak_gb']:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
