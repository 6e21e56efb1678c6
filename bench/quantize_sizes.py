"""Size on disk of full-size PaliGemma checkpoints: bf16 and every quantization recipe.

    .venv/bin/python bench/quantize_sizes.py                 # PaliGemma 2 3B-224
    .venv/bin/python bench/quantize_sizes.py --model pg2-10b-448 --group-size 32
    .venv/bin/python bench/quantize_sizes.py --no-confirm    # arithmetic only

The sizes are computed from shapes, not from materialized weights: `QuantPlan` decides what is
quantized (and pads the SigLIP MLP) exactly as `pg-edge quantize` does, and the quantized
skeleton's parameter shapes (MLX is lazy: nothing is computed) give the bytes: packed weights
uint32, scales/biases and float tensors bf16. To show that this arithmetic is what the tool
writes, a layer-cut model (1 SigLIP layer, 1 decoder layer, 16384-row vocabulary, full widths)
is built with random bf16 weights, really quantized with every recipe, and the tensor bytes it
wrote are compared with the prediction for the same cut config.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pg_edge  # noqa: E402,F401  (first: it loads the fast BLAS before MLX)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from pg_edge.checkpoint.folder import FolderWriter  # noqa: E402
from pg_edge.model.config import PaliGemmaConfig  # noqa: E402
from pg_edge.model.paligemma import PaliGemmaModel  # noqa: E402
from pg_edge.model.variants import official_config, parameter_counts, variants  # noqa: E402
from pg_edge.checkpoint.weights import component  # noqa: E402
from pg_edge.quantize import QuantPlan, quantize  # noqa: E402
from pg_edge.quantize.recipes import COMPONENTS, RECIPES, resolve_settings  # noqa: E402

MODELS = [f"{d}-{s}" for d, s in variants()]


def config_raw(model: str, vision_layers: int | None = None, text_layers: int | None = None,
               vocab: int = 257216) -> dict:
    """"pg2-3b-224" -> its config.json dict (pg_edge.model.variants.official_config)."""
    name, size = model.rsplit("-", 1)
    return official_config(name, int(size), vocab=vocab, vision_layers=vision_layers, text_layers=text_layers)


def predicted_bytes(raw: dict, settings) -> dict[str, int]:
    """Tensor bytes per component of the quantized folder (None settings: the bf16 folder)."""
    out = {c: 0 for c in COMPONENTS}
    if settings is None:
        model = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))
        for k, v in tree_flatten(model.parameters()):
            out[component(k)] += 2 * math.prod(v.shape)
        return out
    plan = QuantPlan.build(raw, settings)
    for k, shape in plan.expected_shapes().items():
        packed = k.endswith(".weight") and k[: -len(".weight")] in plan.targets
        out[component(k)] += (4 if packed else 2) * math.prod(shape)
    return out


param_counts = parameter_counts


def variants(group_size: int) -> list[tuple[str, object]]:
    return [("bf16", None)] + [(r, resolve_settings(recipe=r, group_size=group_size)) for r in RECIPES]


def table(model: str, group_size: int) -> str:
    raw = config_raw(model)
    params = param_counts(raw)
    total = sum(params.values())
    rows = [f"{model}: {total / 1e9:.3f} B parameters (vision {params['vision'] / 1e6:.0f} M, connector "
            f"{params['connector'] / 1e6:.1f} M, decoder {params['decoder'] / 1e6:.0f} M, embed "
            f"{params['embed'] / 1e6:.0f} M); group size {group_size}; GB = 1e9 bytes of tensor data",
            f"{'variant':<18} {'size GB':>8} {'vs bf16':>8} {'bits/w':>7}   "
            + " ".join(f"{c + ' b/w':>14}" for c in COMPONENTS)]
    bf16 = None
    for name, settings in variants(group_size):
        b = predicted_bytes(raw, settings)
        size = sum(b.values())
        bf16 = bf16 or size
        rows.append(f"{name:<18} {size / 1e9:>8.3f} {size / bf16:>8.1%} {8 * size / total:>7.2f}   "
                    + " ".join(f"{8 * b[c] / params[c]:>14.2f}" for c in COMPONENTS))
    return "\n".join(rows)


def confirm(model: str, group_size: int, vocab: int = 16384) -> str:
    """Really quantize a layer-cut model with every recipe; compare written bytes to predicted."""
    raw = config_raw(model, vision_layers=1, text_layers=1, vocab=vocab)
    model_ = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))
    keys = mx.random.split(mx.random.key(0), len(tree_flatten(model_.parameters())))
    weights = {k: (0.02 * mx.random.normal(v.shape, key=keys[i])).astype(mx.bfloat16)
               for i, (k, v) in enumerate(tree_flatten(model_.parameters()))}
    lines = [f"layer-cut check ({model}, 1 SigLIP + 1 decoder layer, vocab {vocab}, full widths):",
             f"{'variant':<18} {'predicted B':>14} {'written B':>14} {'files on disk B':>16}  match"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float"
        with FolderWriter(src, source="bench", converter="bench") as w:
            w.add_shard(weights)
            w.finish(raw)
        for name, settings in variants(group_size)[1:]:
            t0 = time.perf_counter()
            report = quantize(src, Path(tmp) / name, settings=settings, probes=0)
            pred = sum(predicted_bytes(raw, settings).values())
            on_disk = sum(f.stat().st_size for f in (Path(tmp) / name).glob("*.safetensors"))
            ok = "yes" if pred == report.weight_bytes else "NO"
            lines.append(f"{name:<18} {pred:>14,} {report.weight_bytes:>14,} {on_disk:>16,}  {ok}"
                         f"   ({time.perf_counter() - t0:.1f} s)")
    lines.append("(files on disk = tensor bytes + safetensors JSON headers)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pg2-3b-224", choices=MODELS)
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--no-confirm", action="store_true", help="skip the layer-cut quantize-and-save check")
    args = p.parse_args(argv)
    print(table(args.model, args.group_size))
    if not args.no_confirm:
        print()
        print(confirm(args.model, args.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
