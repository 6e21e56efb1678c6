"""Exports of a fine-tuned model.

adapters   OUT/adapters.safetensors + OUT/adapter_config.json: only what trained (LoRA's
           lora_a/lora_b, or the trained weights themselves for attn/full), applied to the
           same base model with `load_adapters`. Small; the base stays shared.
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
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from .. import __version__
from ..errors import PgEdgeError
from ..loader import SIDE_FILES
from ..paligemma import PaliGemmaModel
from .checkpoint import atomic_folder
from .modes import ModeSpec, apply_mode, lora_targets

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files of a model folder other than config.json and the weights (the runtime's list; the
# converter keeps the same one in convert/writer.py, which the runtime may not import).
MAX_SHARD_BYTES = 4 << 30


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _cast(tree: dict, dtype: mx.Dtype) -> dict:
    """Float arrays to `dtype`; packed quantized weights (uint32) unchanged."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tree.items()}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise PgEdgeError(f"output {out} exists; pass --force to overwrite it")


def save_adapters(model: PaliGemmaModel, spec: ModeSpec, out: str | Path, *, base_model: str = "",
                  base_dtype: mx.Dtype = mx.float32, step: int = 0, force: bool = False) -> Path:
    """Write the trainable parameters and what is needed to re-apply them."""
    out = Path(out)
    _check_out(out, force)
    params = dict(tree_flatten(model.trainable_parameters()))
    if spec.mode != "lora":  # trained base weights: back to the base's dtype
        params = _cast(params, base_dtype)
    config = {
        "format": "pg_edge-adapters", "pg_edge_version": __version__, "base_model": base_model,
        "base_dtype": _dtype_name(base_dtype), "step": step, **spec.to_dict(),
    }
    if spec.mode == "lora":
        config["lora"]["scale"] = spec.lora.scale
        config["targets"] = lora_targets(model, spec.freeze_vision)
    with atomic_folder(out) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), params, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def load_adapters(model: PaliGemmaModel, folder: str | Path) -> ModeSpec:
    """Apply saved adapters (or trained weights) to a freshly loaded copy of their base model."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = mx.load(str(folder / ADAPTER_FILE))
    except (OSError, ValueError, RuntimeError) as err:
        raise PgEdgeError(f"cannot read adapters in {folder}: {str(err).splitlines()[0]}") from None
    lora = {k: v for k, v in (config.get("lora") or {}).items() if k != "scale"}
    spec = ModeSpec.from_dict({**config, "lora": lora})
    trainable = set(apply_mode(model, spec))
    if set(weights) != trainable:
        raise PgEdgeError(f"{folder / ADAPTER_FILE} does not fit this model "
                          f"({len(set(weights) - trainable)} unexpected, {len(trainable - set(weights))} missing)")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    model.eval()
    return spec


def fuse_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged layer (re-quantized where the base was)."""
    merged = [(path, m.fuse(dequantize=False)) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return model


def _shards(weights: dict) -> list[dict]:
    shards, cur, size = [], {}, 0
    for k in sorted(weights):
        n = weights[k].nbytes
        if cur and size + n > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = weights[k]
        size += n
    return shards + [cur]


def save_fused(model: PaliGemmaModel, base_folder: str | Path, out: str | Path, *,
               base_dtype: mx.Dtype = mx.float32, force: bool = False) -> Path:
    """Write the fine-tuned model as a converted folder beside nothing else (atomic).

    base_folder: the folder the base model was loaded from (config.json, tokenizer files)."""
    out, base_folder = Path(out), Path(base_folder)
    _check_out(out, force)
    fuse_lora(model)
    weights = _cast(dict(tree_flatten(model.parameters())), base_dtype)
    raw = json.loads((base_folder / "config.json").read_text())
    if not (raw.get("quantization") or raw.get("quantization_config")):
        raw["torch_dtype"] = _dtype_name(base_dtype)
    meta = {"format": "mlx", "pg_edge_version": __version__, "pg_edge_source": str(base_folder),
            "pg_edge_converter": "finetune"}
    with atomic_folder(out) as tmp:
        shards = _shards(weights)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            mx.save_safetensors(str(tmp / name), shard, metadata=meta)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in sorted(s)}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        for name in SIDE_FILES:
            if (base_folder / name).is_file():
                shutil.copy2(base_folder / name, tmp / name)
    return out
