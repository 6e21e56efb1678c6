"""LoRA adapters for the demo model without training (fixtures/adapters.py makes them)."""
from __future__ import annotations

from pathlib import Path

from fixtures.adapters import make_random_adapter

DEMO = "pg_edge/demo/model"


def make_adapter(out: Path, seed: int, rank: int = 4, base: str = DEMO, strength: float = 0.5,
                 freeze_vision: bool = False) -> Path:
    return make_random_adapter(base, out, seed, rank=rank, strength=strength, freeze_vision=freeze_vision)
