"""Adapters from `pg-edge finetune --export adapters`, applied to a freshly loaded base model.

    ADAPTERS/
        adapters.safetensors   what trained: LoRA's lora_a/lora_b, or the trained weights
        adapter_config.json    format, mode (lora/attn/full), LoRA rank/scale/targets, base model

The runtime reads them (`pg_edge.load(model, adapters=ADAPTERS)`); pg_edge.train.export writes
them. The LoRA layers are mlx-lm's (mlx_lm.tuner), imported only when adapters are applied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PgEdgeError
from .safetensors_check import load_safetensors
from .model.paligemma import PaliGemmaModel

if TYPE_CHECKING:
    from .train.modes import ModeSpec

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def load_adapters(model: PaliGemmaModel, folder: str | Path) -> "ModeSpec":
    """Apply saved adapters (or trained weights) to a freshly loaded copy of their base model."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights, _ = load_safetensors(folder / ADAPTER_FILE)  # header checked in Python first
    except (OSError, ValueError, RuntimeError) as err:
        raise PgEdgeError(f"cannot read adapters in {folder}: {str(err).splitlines()[0]}") from None
    lora = {k: v for k, v in (config.get("lora") or {}).items() if k != "scale"}
    from .train.modes import ModeSpec, apply_mode  # LoRA layers: mlx-lm's tuner, only when asked

    spec = ModeSpec.from_dict({**config, "lora": lora})
    trainable = set(apply_mode(model, spec))
    if set(weights) != trainable:
        raise PgEdgeError(f"{folder / ADAPTER_FILE} does not fit this model "
                          f"({len(set(weights) - trainable)} unexpected, {len(trainable - set(weights))} missing)")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    model.eval()
    return spec
