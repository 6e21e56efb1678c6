"""LoRA adapters for the demo model without training: random factors (B not zero, so each
adapter changes the answers), written by pg_edge.train.export.save_adapters like a fine-tune's."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

DEMO = "pg_edge/demo/model"


def make_adapter(out: Path, seed: int, rank: int = 4, base: str = DEMO, strength: float = 0.5,
                 freeze_vision: bool = False) -> Path:
    from pg_edge.loader import load_model
    from pg_edge.train.export import save_adapters
    from pg_edge.adapters import LoraSettings, ModeSpec, apply_mode

    model = load_model(base)[0]
    spec = ModeSpec("lora", freeze_vision, LoraSettings(rank=rank, alpha=2.0 * rank))
    mx.random.seed(seed)
    apply_mode(model, spec)
    trained = tree_flatten(model.trainable_parameters())
    update = [(k, mx.random.normal(v.shape) * strength) for k, v in trained if k.endswith("lora_b")]
    model.update(tree_unflatten(update))
    return save_adapters(model, spec, out, base_model=str(base), force=True)
