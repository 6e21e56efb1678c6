"""Which tensors of a float PaliGemma checkpoint are quantized, at what setting, and how:
`QuantPlan` turns float tensors (classic keys, MLX layouts) into the tensors of MLX's quantized
layers, any subset at a time, and writes the config.json that both pg_edge and mlx-vlm read.

    plan = QuantPlan.build(config_raw, settings)
    out = plan.apply({key: tensor})           # path.weight -> path.{weight,scales,biases}
    config = plan.config_dict()               # quantization section, padded SigLIP width

`quantize()` streams the checkpoint through `apply` one tensor at a time, big ones in row
blocks (pg_edge.checkpoint.stream_convert): every transform here acts on each row alone (group-wise
quantization along a row, fc2's padding adds columns), except fc1's padding, which adds rows,
so fc1 goes whole.

The SigLIP MLP width (4304 in the real checkpoints, 72 in the test fixtures) is a multiple of
none of MLX's group sizes, and it is fc2's input width, so fc2 cannot be quantized as it is. It
is zero-padded to the next multiple of the vision group size: fc1 gains zero rows and zero
biases (those hidden units output gelu(0) = 0) and fc2 zero columns, so the float function is
exactly unchanged. 4304 -> 4320 for group 32, 4352 for 64 and 128.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from pg_edge.model.config import PaliGemmaConfig
from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.folder import is_quantized
from pg_edge.model.paligemma import PaliGemmaModel
from pg_edge.checkpoint.weights import component

from .recipes import MODE, Quant, QuantSettings

VISION_MLP = re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)$")
# Embedding-typed, but read as a raw table (`.weight[None]`), never looked up: stays float.
NEVER = ("position_embedding",)


def padded_width(width: int, group_size: int) -> int:
    """Smallest multiple of group_size >= width (4304 -> 4320 / 4352 / 4352 for 32 / 64 / 128)."""
    return -(-width // group_size) * group_size


def pad_vision_mlp(key: str, value: mx.array, width: int, padded: int) -> mx.array:
    """Zero-pad one SigLIP MLP tensor from `width` to `padded` hidden units (exact: the extra
    fc1 rows/biases are 0, so their GELU outputs are 0, and fc2's extra columns are 0 anyway).

    fc1.weight float[I, C] -> [I', C]; fc1.bias float[I] -> [I']; fc2.weight float[C, I] ->
    [C, I']; fc2.bias is unchanged."""
    m = VISION_MLP.match(key)
    if m is None or padded == width:
        return value
    layer, kind = m.groups()
    if layer == "fc2" and kind == "bias":
        return value
    axis = 1 if layer == "fc2" else 0
    if value.shape[axis] != width:
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}; expected SigLIP MLP width {width}")
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, padded - width)
    return mx.pad(value, pad)


@dataclass
class QuantPlan:
    """A decision per Linear/Embedding of the model: quantized with a `Quant`, or left float.

    targets: module path -> Quant; left_float: module path -> why a module the settings asked
    to quantize could not be (its input width does not divide the group size);
    vision_width: (original, padded) SigLIP MLP width."""

    raw: dict
    settings: QuantSettings
    tie: bool
    targets: dict[str, Quant] = field(default_factory=dict)
    left_float: dict[str, str] = field(default_factory=dict)
    vision_width: tuple[int, int] = (0, 0)

    @classmethod
    def build(cls, raw: dict, settings: QuantSettings, tie: bool | None = None,
              shapes: dict[str, tuple] | None = None) -> "QuantPlan":
        """raw: the float checkpoint's config.json dict; shapes: its tensor shapes (classic
        keys) when known, checked against the config (the SigLIP width is taken from them:
        some configs misstate it)."""
        if is_quantized(raw):
            raise CheckpointError("the checkpoint is already quantized; quantize its float source")
        config = PaliGemmaConfig.from_dict(raw)
        raw = copy.deepcopy(raw)
        if shapes is not None:
            config.adopt_vision_mlp_width(shapes)
            config.check_shapes(shapes)
            raw.setdefault("vision_config", {})["intermediate_size"] = config.vision.intermediate_size
        tie = PaliGemmaConfig.from_dict(raw).tie_word_embeddings if tie is None else tie
        width = config.vision.intermediate_size
        vq = settings.vision
        padded = padded_width(width, vq.group_size) if vq else width
        config.vision.intermediate_size = padded
        plan = cls(raw=raw, settings=settings, tie=tie, vision_width=(width, padded))
        # The model skeleton names every quantizable module exactly as the loaders will see it
        # (MLX is lazy: its random initial weights are never computed).
        model = PaliGemmaModel(config, tie_word_embeddings=tie)
        for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            if not isinstance(module, (nn.Linear, nn.Embedding)) or any(n in path for n in NEVER):
                continue
            q = settings.for_component(component(path + ".weight"))
            if q is None:
                continue
            in_dim = module.weight.shape[-1]
            if in_dim % q.group_size:
                plan.left_float[path] = f"input width {in_dim} is not a multiple of group size {q.group_size}"
            else:
                plan.targets[path] = q
        return plan

    # -- tensors ---------------------------------------------------------------------------
    def apply(self, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        """Float tensors (any subset of the checkpoint) -> the quantized folder's tensors.

        A quantized module's `weight` becomes uint32-packed `weight` + `scales` + `biases`
        (float[out, in/group], the dtype of the source weight), as `QuantizedLinear` and
        `QuantizedEmbedding` store them; every other tensor passes through (SigLIP MLP padded)."""
        width, padded = self.vision_width
        out: dict[str, mx.array] = {}
        for key, value in tensors.items():
            if key.endswith(".scales"):
                raise CheckpointError(f"{key}: the checkpoint is already quantized")
            value = pad_vision_mlp(key, value, width, padded)
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            q = self.targets.get(path) if path else None
            if q is None:
                out[key] = value
                continue
            wq, scales, biases = mx.quantize(value, group_size=q.group_size, bits=q.bits, mode=MODE)
            out[key] = wq
            out[path + ".scales"] = scales
            out[path + ".biases"] = biases
        return out

    def expected_shapes(self) -> dict[str, tuple]:
        """Parameter shapes of the quantized model, as the loaders build it from config_dict()."""
        config = PaliGemmaConfig.from_dict(self.config_dict())
        model = PaliGemmaModel(config, tie_word_embeddings=self.tie)
        section = self.quantization_section()

        def predicate(path, module):
            return path in self.targets and section.get(path, True)

        nn.quantize(model, group_size=section["group_size"], bits=section["bits"], mode=MODE,
                    class_predicate=predicate)
        return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    def check_complete(self, got: dict[str, tuple]) -> None:
        """Raise unless `got` (the written tensors' shapes) is exactly what the loaders need."""
        want = self.expected_shapes()
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has an unexpected {extra[0]}"
            raise CheckpointError(f"the quantized checkpoint {what} ({len(missing)} missing, {len(extra)} extra)")
        for k, shape in want.items():
            if tuple(got[k]) != shape:
                raise CheckpointError(f"{k} has shape {tuple(got[k])}, expected {shape}")

    # -- config ----------------------------------------------------------------------------
    def default_quant(self) -> Quant:
        """The section's top-level setting: the decoder's (most modules), else the commonest."""
        if self.settings.decoder is not None:
            return self.settings.decoder
        counts: dict[Quant, int] = {}
        for q in self.targets.values():
            counts[q] = counts.get(q, 0) + 1
        return max(counts, key=counts.get) if counts else Quant(4, 64)

    def quantization_section(self) -> dict:
        """mlx-lm's convention: top-level group_size/bits/mode for modules that have `.scales`,
        plus a per-module entry wherever a module's setting differs from it. mlx-vlm also
        refuses modules whose weight size is not a multiple of 64 unless they have an entry."""
        default = self.default_quant()
        section = default.as_config()
        shapes = None
        for path, q in sorted(self.targets.items()):
            if q != default:
                section[path] = q.as_config()
                continue
            shapes = shapes or self._float_shapes()
            out_dim, in_dim = shapes[path + ".weight"]
            if (out_dim * in_dim) % 64:
                section[path] = q.as_config()
        return section

    def _float_shapes(self) -> dict[str, tuple]:
        config = PaliGemmaConfig.from_dict(self.raw)
        config.vision.intermediate_size = self.vision_width[1]
        model = PaliGemmaModel(config, tie_word_embeddings=self.tie)
        return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    def config_dict(self) -> dict:
        """The source config.json with the quantization section (also as `quantization_config`,
        which mlx-lm/mlx-vlm write too), the padded SigLIP width (mlx-vlm builds its model from
        the config), and what pg_edge did under "pg_edge"."""
        raw = copy.deepcopy(self.raw)
        width, padded = self.vision_width
        if padded != width:
            raw.setdefault("vision_config", {})["intermediate_size"] = padded
        section = self.quantization_section()
        raw["quantization"] = section
        raw["quantization_config"] = copy.deepcopy(section)
        record = dict(raw.get("pg_edge") or {})
        record["quantization"] = {
            "settings": self.settings.as_dict(),
            "vision_intermediate_size": width,
            "padded_vision_intermediate_size": padded,
            "left_float": dict(sorted(self.left_float.items())),
        }
        raw["pg_edge"] = record
        return raw


def quantize_weights(config_raw: dict, weights: dict[str, mx.array],
                     settings: QuantSettings) -> tuple[dict[str, mx.array], dict]:
    """In-memory float checkpoint (sanitized: classic keys, MLX layouts) -> (quantized weights,
    the config.json dict to write beside them), checked complete; the in-memory twin of the
    streamed `quantize()` (tests check the two agree tensor for tensor)."""
    tie = "language_model.lm_head.weight" not in weights
    plan = QuantPlan.build(config_raw, settings, tie=tie, shapes={k: tuple(v.shape) for k, v in weights.items()})
    out = plan.apply(weights)
    plan.check_complete({k: tuple(v.shape) for k, v in out.items()})
    return out, plan.config_dict()
