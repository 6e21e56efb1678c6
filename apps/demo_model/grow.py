"""Deepen the demo model: append layers to its SigLIP and Gemma2 stacks that start as the identity.

    python -m apps.demo_model.grow HF_IN -o HF_OUT --text-layers 6 --vision-layers 6

Each new layer is a copy of the stack's last layer with its residual branches switched off:
Gemma2's post-attention and post-feed-forward norms get weight -1 (the norm scales by 1 + w, so
the branch adds exactly 0 and the norm weight receives the gradient that turns it on), SigLIP's
attention output and fc2 projections are zero (weight and bias). The grown model computes the same
logits as the input one; training then uses the new depth (apps/demo_model/README.md, issue 20:
the 4 + 4 layer model stopped improving on prompts that name one or two kinds).
HF_IN / HF_OUT: transformers PaliGemma folders (config.json, model.safetensors, tokenizer files).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

TEXT = "language_model.model.layers."
VISION = "vision_tower.encoder.layers."


def grown(tensors: dict[str, np.ndarray], prefix: str, have: int, want: int, off) -> dict[str, np.ndarray]:
    """tensors plus layers have..want-1 of `prefix`, each a copy of layer have-1 passed through
    off(name, array) (the branch switch)."""
    out = dict(tensors)
    last = {k[len(f"{prefix}{have - 1}."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}{have - 1}.")}
    for i in range(have, want):
        for name, v in last.items():
            out[f"{prefix}{i}.{name}"] = off(name, v.copy())
    return out


def text_off(name: str, v: np.ndarray) -> np.ndarray:
    if name in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"):
        return np.full_like(v, -1.0)
    return v


def vision_off(name: str, v: np.ndarray) -> np.ndarray:
    if re.fullmatch(r"(self_attn\.out_proj|mlp\.fc2)\.(weight|bias)", name):
        return np.zeros_like(v)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--text-layers", type=int, required=True)
    p.add_argument("--vision-layers", type=int, required=True)
    a = p.parse_args()
    src, dst = a.input.resolve(), a.output.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise SystemExit(f"grow: the output {a.output} must lie outside the input {a.input} (and not hold it)")
    cfg = json.loads((a.input / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    if a.text_layers < t["num_hidden_layers"] or a.vision_layers < v["num_hidden_layers"]:
        raise SystemExit("grow adds layers; it never removes them")
    tensors = load_file(str(a.input / "model.safetensors"))
    tensors = grown(tensors, TEXT, t["num_hidden_layers"], a.text_layers, text_off)
    tensors = grown(tensors, VISION, v["num_hidden_layers"], a.vision_layers, vision_off)
    if "layer_types" in t:  # Gemma2 alternates sliding and full attention from layer 0
        t["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(a.text_layers)]
    t["num_hidden_layers"], v["num_hidden_layers"] = a.text_layers, a.vision_layers
    tmp = a.output.with_name(a.output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(a.input, tmp, ignore=shutil.ignore_patterns("model*.safetensors", "config.json"))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(a.output, ignore_errors=True)
    tmp.rename(a.output)
    print(f"{a.input} -> {a.output}: {a.text_layers} text layers, {a.vision_layers} vision layers, "
          f"{sum(x.size for x in tensors.values()):,} parameters")


if __name__ == "__main__":
    main()
