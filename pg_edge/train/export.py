"""Exports of a fine-tuned model.

adapters   OUT/adapters.safetensors + OUT/adapter_config.json: only what trained (LoRA's
           lora_a/lora_b, or the trained weights themselves for attn/full), applied to the
           same base model with pg_edge.adapters.load_adapters (`pg_edge.load(..., adapters=)`). Small; the base stays shared.
fused      a normal converted folder (config.json, model*.safetensors with the `format: mlx`
           marker, tokenizer and processor files) that `pg_edge.load` reads like any other.
           LoRA is merged into the base weights (mlx-lm's LoRALinear.fuse); on a quantized
           base the merged layers are re-quantized with the base layer's own bits and group
           size, so the folder keeps the base's `quantization` section and size. Trained f32
           master weights are cast back to the base's dtype.

Both are written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .._mlx_lm import LoRALinear
from .. import __version__
from ..checkpoint.atomic import save_safetensors
from ..adapters import ADAPTER_CONFIG, ADAPTER_FILE, ModeSpec, apply_mode, base_fingerprint, lora_targets
from ..checkpoint.folder import FolderWriter, atomic_folder, is_quantized, read_config
from ..model.paligemma import PaliGemmaModel
from ..checkpoint.output_check import check_output



def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _cast(tree: dict, dtype: mx.Dtype) -> dict:
    """Float arrays to `dtype`; packed quantized weights (uint32) unchanged."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tree.items()}


def save_adapters(model: PaliGemmaModel, spec: ModeSpec, out: str | Path, *, base_model: str = "",
                  base_dtype: mx.Dtype = mx.float32, step: int = 0, force: bool = False) -> Path:
    """Write the trainable parameters and what is needed to re-apply them."""
    out = Path(out)
    check_output(out, force, kind="adapters")
    params = dict(tree_flatten(model.trainable_parameters()))
    if spec.mode != "lora":  # trained base weights: back to the base's dtype
        params = _cast(params, base_dtype)
    config = {
        "format": "pg_edge-adapters", "pg_edge_version": __version__, "base_model": base_model,
        "base_fingerprint": base_fingerprint(model),
        "base_dtype": _dtype_name(base_dtype), "step": step, **spec.to_dict(),
    }
    if spec.mode == "lora":
        config["lora"]["scale"] = spec.lora.scale
        config["targets"] = lora_targets(model, spec.freeze_vision)
    with atomic_folder(out) as tmp:
        save_safetensors(tmp / ADAPTER_FILE, params, metadata={"format": "mlx"})  # full disk -> PgEdgeError
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def fuse_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged layer (re-quantized where the base was)."""
    merged = [(path, m.fuse(dequantize=False)) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return model


def save_fused(model: PaliGemmaModel, base_folder: str | Path, out: str | Path, *,
               base_dtype: mx.Dtype = mx.float32, force: bool = False) -> Path:
    """Write the fine-tuned model as a converted folder beside nothing else (atomic).

    base_folder: the folder the base model was loaded from (config.json, tokenizer files)."""
    out, base_folder = Path(out), Path(base_folder)
    check_output(out, force, kind="model", inputs=[base_folder])
    fuse_lora(model)
    weights = _cast(dict(tree_flatten(model.parameters())), base_dtype)
    raw = dict(read_config(base_folder).raw)
    if not is_quantized(raw):
        raw["torch_dtype"] = _dtype_name(base_dtype)
    with FolderWriter(out, force=force, source=str(base_folder), converter="finetune",
                      inputs=[base_folder]) as writer:
        writer.add_weights(weights)
        writer.finish(raw, source_folder=base_folder)
    return out
