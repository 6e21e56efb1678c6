"""Named LoRA adapters on one shared base: `pg_edge.load(MODEL, adapters={"name": DIR})`,
`pg.add_adapter(name, DIR)`, `pg.remove_adapter(name)`, then `adapter="name"` on any call.

Each adapter is read once (pg_edge.adapters.lora_factors: refused in one line when it was made
for another base, or is not LoRA). Its factors go into the model's `MultiLoRALinear` layers
(pg_edge.multi_lora), which wrap the base layers the first time an adapter needs them: the
base weights are never copied or changed. A request's adapter becomes its row's slot (slot 0 =
the base alone); `routing` tells the layers which slot each row of the next call uses.

Adapters differ in their vision part: one trained with a frozen SigLIP (`freeze_vision`) has no
delta there, but every LoRA adapter has one on the connector, so image features are cached per
(image, adapter) — `feature_key`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PgEdgeError
from .multi_lora import MultiLoRALinear, Routing, wrap

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Adapter:
    name: str
    folder: Path
    slot: int
    rank: int
    factors: dict  # layer path -> (A float[in, r], B float[r, out], scale)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.factors.values())


class AdapterBank:
    def __init__(self, model):
        self.model = model
        self.routing = Routing()
        self.adapters: dict[str, Adapter] = {}
        self.layers: dict[str, MultiLoRALinear] = {}

    def names(self) -> list[str]:
        return list(self.adapters)

    def slot(self, name: str | None) -> int:
        """0 for None (the base alone), else the adapter's slot; unknown names refused."""
        if name is None:
            return 0
        adapter = self.adapters.get(name) if isinstance(name, str) else None
        if adapter is None:
            have = ", ".join(self.adapters) or "none loaded"
            raise PgEdgeError(f"no adapter named {name!r} (adapters: {have})")
        return adapter.slot

    def feature_key(self, slot: int) -> str:
        return "" if slot == 0 else f"adapter{slot}"

    def add(self, name: str, folder) -> Adapter:
        """Read, check and add one LoRA folder under `name` (the model changes only once every
        check passed)."""
        from .adapters import lora_factors

        if not isinstance(name, str) or not NAME.match(name):
            raise PgEdgeError(f"adapter name {name!r}: use letters, digits and . _ : / - (up to 128)")
        if name in self.adapters:
            raise PgEdgeError(f"an adapter named {name!r} is loaded already (remove_adapter first)")
        spec, factors = lora_factors(folder, self.model)
        used = {a.slot for a in self.adapters.values()}
        slot = next(i for i in range(1, len(used) + 2) if i not in used)
        scale = spec.lora.scale
        adapter = Adapter(name, Path(folder), slot, spec.lora.rank,
                          {p: (a, b, scale) for p, (a, b) in factors.items()})
        self.layers = wrap(self.model, list(factors), self.routing)
        self.adapters[name] = adapter
        self._rebuild()
        return adapter

    def remove(self, name: str) -> None:
        self.slot(name)  # unknown names refused
        del self.adapters[name]
        self._rebuild()

    def _rebuild(self) -> None:
        """Every wrapped layer's stacks from the adapters loaded now (slots 1..max)."""
        top = max([0] + [a.slot for a in self.adapters.values()])
        by_slot = {a.slot: a for a in self.adapters.values()}
        for path, layer in self.layers.items():
            layer.set_factors([by_slot[s].factors.get(path) if s in by_slot else None
                               for s in range(1, top + 1)])


__all__ = ["AdapterBank", "Adapter"]
