"""What to quantize, and how: per-component settings and the named recipes.

A PaliGemma checkpoint has four components (`pg_edge.checkpoint.weights.component`):
    vision     SigLIP: attention and MLP Linears (patch conv, position table, norms stay float)
    connector  multi_modal_projector.linear
    decoder    Gemma's attention and MLP Linears
    embed      embed_tokens (also the tied LM head, via QuantizedEmbedding.as_linear) or lm_head
Each component is either left float (None) or quantized group-wise affine at `bits` with
`group_size` columns per (scale, bias) pair, through MLX's quantized layers.

Recipes (measured on the fixtures and sized for full PaliGemma 2 3B-224 in the issue's report):
    decoder4-vision8  decoder 4-bit; vision, connector, embeddings/head 8-bit   (the default)
    all8              everything 8-bit
    all4              everything 4-bit
    decoder4          decoder and embeddings 4-bit, vision and connector float (what mlx-vlm does)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pg_edge.errors import PgEdgeError

COMPONENTS = ("vision", "connector", "decoder", "embed")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
UNSET = "unset"  # a per-component argument nobody gave (None means "leave float")


@dataclass(frozen=True)
class Quant:
    """Group-wise affine quantization of one component's matrices."""

    bits: int
    group_size: int = 64

    def as_config(self) -> dict:
        """The per-module entry of config.json's `quantization` section (`to_quantized` kwargs)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}

    def __str__(self) -> str:
        return f"{self.bits}-bit g{self.group_size}"


@dataclass(frozen=True)
class QuantSettings:
    """One `Quant` (or None: float) per component, and the recipe name they came from."""

    vision: Quant | None
    connector: Quant | None
    decoder: Quant | None
    embed: Quant | None
    recipe: str = "custom"

    def for_component(self, name: str) -> Quant | None:
        return getattr(self, name)

    def any(self) -> bool:
        return any(self.for_component(c) for c in COMPONENTS)

    def as_dict(self) -> dict:
        out = {c: (asdict(q) if q else None) for c in COMPONENTS for q in [self.for_component(c)]}
        out["recipe"] = self.recipe
        return out


# bits per component of each recipe: `b` is the run's --bits (4 unless asked otherwise) where a
# recipe says so; None leaves a component float.
RECIPES: dict[str, dict[str, int | None | str]] = {
    "decoder4-vision8": {"vision": 8, "connector": 8, "decoder": 4, "embed": 8},
    "all8": {"vision": 8, "connector": 8, "decoder": 8, "embed": 8},
    "all4": {"vision": 4, "connector": 4, "decoder": 4, "embed": 4},
    "decoder4": {"vision": None, "connector": None, "decoder": 4, "embed": 4},
}
# Chosen by measurement (bench/quantize_recipes.py on the fixtures, bench/quantize_sizes.py for
# PaliGemma 2 3B-224 with bf16 scales). Per GB saved, 4 bits cost the least quality in the
# decoder (on PG2 on a par with SigLIP) and the most in the embeddings, which are also the LM
# head: mean KL added per GB saved, PG1/PG2, decoder 0.15/0.15, SigLIP 0.25/0.15, embeddings
# 0.35/0.20. So the decoder goes to 4 bits first and the rest stays at 8: 2.21 GB (36.5% of
# bf16), both smaller and closer to float than mlx-vlm's mix `decoder4` (2.30 GB; mean KL 0.149
# vs 0.249 on the PG1 fixture, 0.156 vs 0.199 on PG2; top-1 0.91 vs 0.80 on PG1). all4 (1.71 GB)
# loses the most (PG1 top-1 0.78, KL 0.51); all8 (3.23 GB) is the near-lossless one (KL < 0.001).
DEFAULT_RECIPE = "decoder4-vision8"


def check_bits(bits, what: str = "bits") -> int:
    if bits not in BITS:
        raise PgEdgeError(f"{what} must be 4 or 8, got {bits!r}")
    return int(bits)


def check_group_size(group_size) -> int:
    if group_size not in GROUP_SIZES:
        raise PgEdgeError(
            f"group size must be 32, 64 or 128 (MLX's affine quantization), got {group_size!r}"
        )
    return int(group_size)


def parse_component_bits(value: str | int | None, what: str):
    """CLI value for --vision-bits etc.: "4", "8", or "none"/"float" (leave float)."""
    if value is None or value == UNSET:
        return UNSET
    if isinstance(value, str) and value.lower() in ("none", "float", "off"):
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = None
    if bits not in BITS:
        raise PgEdgeError(f"{what} must be 4, 8 or none, got {value!r}")
    return bits


def resolve_settings(
    *,
    bits: int | None = None,
    group_size: int = 64,
    vision_bits=UNSET,
    connector_bits=UNSET,
    embed_bits=UNSET,
    recipe: str | None = None,
) -> QuantSettings:
    """Settings from the tool's arguments: the recipe (default `DEFAULT_RECIPE`) gives every
    component's bits, `bits` replaces the decoder's (the bulk of the weights), and explicit
    per-component bits (4, 8, or None for float) replace the rest.

    So with the default recipe `--bits 4` is decoder4-vision8 and `--bits 8` is all8. The
    result is named after the recipe whose mix it equals, else "custom".
    """
    group_size = check_group_size(group_size)
    if recipe is not None and recipe not in RECIPES:
        raise PgEdgeError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    table = dict(RECIPES[recipe or DEFAULT_RECIPE])
    if bits is not None:
        table["decoder"] = check_bits(bits)
    overrides = {"vision": vision_bits, "connector": connector_bits, "embed": embed_bits}
    for comp, value in overrides.items():
        value = parse_component_bits(value, f"{comp} bits")
        if value is not UNSET:
            table[comp] = value
    names = [n for n, t in RECIPES.items() if t == table]
    name = (recipe if recipe in names else names[0]) if names else "custom"
    quants = {c: (Quant(b, group_size) if b is not None else None) for c, b in table.items()}
    settings = QuantSettings(**quants, recipe=name)
    if not settings.any():
        raise PgEdgeError("nothing to quantize: every component is left float")
    return settings
