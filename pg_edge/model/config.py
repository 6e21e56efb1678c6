"""Configuration of a PaliGemma model, read from a Hugging Face style `config.json`.

Three small dataclasses mirror the three parts of the checkpoint: `VisionConfig` (SigLIP),
`TextConfig` (Gemma or Gemma2) and `PaliGemmaConfig` (the composition). Gemma vs Gemma2 is
expressed as explicit flags (softcaps, extra norms, query scale, sliding window) so the model
code never switches on a model-type string.

Configs sometimes lie (the top-level `hidden_size` of every PaliGemma 2 config is a stale 2048;
an mlx-community 448 config lists the SigLIP MLP as 4352): `check_shapes` compares the config
with the tensors actually present and says which one disagrees; it changes nothing. The one
dimension taken from the tensors is the SigLIP MLP width, by the explicit step
`adopt_vision_mlp_width` that the load and convert pipelines call first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import CheckpointError
from .config_checks import check_config

IMAGE_TOKEN_INDEX = 257152  # `<image>`; also the size of the real (unpadded) vocabulary


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TextConfig:
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257216
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_activation: str = "gelu_pytorch_tanh"
    # Gemma2 flags (all off for Gemma 1).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    sandwich_norms: bool = False  # post-attention and pre/post-feedforward norms
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    @property
    def query_scale(self) -> float:
        """Scale of q.k: query_pre_attn_scalar**-0.5 (Gemma2; 144 for 28B), else head_dim**-0.5."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    def window_for_layer(self, i: int) -> int | None:
        """Sliding window of decoder layer i, or None for global attention."""
        if self.sliding_window is None or self.layer_types is None:
            return None
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None


@dataclass
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = IMAGE_TOKEN_INDEX
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    raw: dict = field(default_factory=dict)  # the config.json as read, written back unchanged

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LM head is the embedding (the default in every PaliGemma config)."""
        t = self.raw.get("text_config") or {}
        return t.get("tie_word_embeddings", self.raw.get("tie_word_embeddings", True)) is not False

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def real_vocab_size(self) -> int:
        """Ids the model may emit: the HF embedding is padded past `<image>` with junk rows."""
        return min(self.image_token_index, self.text.vocab_size)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PaliGemmaConfig":
        if not isinstance(raw, Mapping):
            raise CheckpointError("config.json must hold a JSON object")
        if raw.get("model_type") != "paligemma":
            raise CheckpointError(
                f"config.json has model_type {raw.get('model_type')!r}, expected 'paligemma'"
            )
        check_config(dict(raw))  # types and ranges, naming the field (pg_edge.model.config_checks)
        v = dict(raw.get("vision_config") or {})
        t = dict(raw.get("text_config") or {})
        vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v})
        text_type = t.get("model_type", "gemma")
        if text_type not in ("gemma", "gemma2"):
            raise CheckpointError(f"text_config.model_type {text_type!r} is not gemma or gemma2")
        gemma2 = text_type == "gemma2"
        # The top-level hidden_size is deliberately ignored: stale in PaliGemma 2 configs.
        hidden = int(t.get("hidden_size", raw.get("projection_dim", 2048)))
        heads = int(t.get("num_attention_heads", 8))
        text = TextConfig(
            hidden_size=hidden,
            intermediate_size=int(t.get("intermediate_size", 16384)),
            num_hidden_layers=int(t.get("num_hidden_layers", 18)),
            num_attention_heads=heads,
            num_key_value_heads=int(t.get("num_key_value_heads", heads)),
            head_dim=int(t.get("head_dim") or hidden // heads),
            vocab_size=int(t.get("vocab_size", raw.get("vocab_size", 257216))),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(t)),
            # HF Gemma uses tanh-GELU whatever `hidden_act` says unless hidden_activation is set.
            hidden_activation=t.get("hidden_activation") or "gelu_pytorch_tanh",
        )
        if gemma2:
            text.attn_logit_softcapping = t.get("attn_logit_softcapping", 50.0)
            text.final_logit_softcapping = t.get("final_logit_softcapping", 30.0)
            text.query_pre_attn_scalar = t.get("query_pre_attn_scalar", 256)
            text.sandwich_norms = True
            text.sliding_window = t.get("sliding_window", 4096)
            text.layer_types = t.get("layer_types") or [
                # transformers' default for Gemma2: even layers (0-based) slide.
                "sliding_attention" if (i + 1) % 2 else "full_attention"
                for i in range(text.num_hidden_layers)
            ]
        eos = raw.get("eos_token_id", 1)
        return cls(
            vision=vision,
            text=text,
            image_token_index=int(raw.get("image_token_index", raw.get("image_token_id", IMAGE_TOKEN_INDEX))),
            bos_token_id=int(raw.get("bos_token_id", 2)),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            pad_token_id=int(raw.get("pad_token_id", 0)),
            raw=dict(raw),
        )

    def adopt_vision_mlp_width(self, shapes: Mapping[str, tuple]) -> None:
        """Take the SigLIP MLP width from the fc1 tensor (classic key, float[I, C]) when present:
        mlx-community configs misstate it (4352 vs 4304), and quantization zero-pads it (the
        zero rows/columns leave the output unchanged), so the tensor is the truth here."""
        fc1 = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
        if fc1 in shapes and len(shapes[fc1]) == 2:
            self.vision.intermediate_size = int(shapes[fc1][0])

    def check_shapes(self, shapes: Mapping[str, tuple]) -> None:
        """Check config dimensions against tensor shapes (classic key names, MLX layouts);
        raises CheckpointError naming the key on the first mismatch. Changes nothing."""
        vp = "vision_tower.vision_model."
        tp = "language_model.model."

        def expect(key: str, axis: int, value: int, what: str) -> None:
            if key not in shapes:
                raise CheckpointError(f"missing tensor {key}")
            if len(shapes[key]) <= axis:
                raise CheckpointError(f"{key} has shape {tuple(shapes[key])}; expected more dimensions")
            got = shapes[key][axis]
            if got != value:
                raise CheckpointError(f"{key} has {what} {got} but config.json says {value}")

        fc1 = vp + "encoder.layers.0.mlp.fc1.weight"
        if fc1 in shapes:
            expect(fc1, 0, self.vision.intermediate_size, "hidden units (vision intermediate_size)")
        expect(vp + "embeddings.patch_embedding.weight", 0, self.vision.hidden_size, "width")
        expect(vp + "embeddings.patch_embedding.weight", 1, self.vision.patch_size, "kernel size (patch_size)")
        expect(vp + "embeddings.position_embedding.weight", 0, self.vision.num_patches,
               "positions (image_size/patch_size squared)")
        emb = shapes.get(tp + "embed_tokens.weight")
        if emb is None:
            raise CheckpointError(f"missing tensor {tp}embed_tokens.weight")
        if len(emb) != 2 or emb[0] != self.text.vocab_size:
            raise CheckpointError(
                f"{tp}embed_tokens.weight has {emb[0]} rows but config.json says vocab_size "
                f"{self.text.vocab_size}"
            )
        qk = tp + "layers.0.self_attn.q_proj.weight"
        expect(qk, 0, self.text.num_attention_heads * self.text.head_dim, "rows (heads x head_dim)")
        expect(tp + "layers.0.self_attn.k_proj.weight", 0,
               self.text.num_key_value_heads * self.text.head_dim, "rows (kv heads x head_dim)")
        expect(tp + "norm.weight", 0, self.text.hidden_size, "width")
        expect("multi_modal_projector.linear.bias", 0, self.text.hidden_size, "width")
        last = tp + f"layers.{self.text.num_hidden_layers - 1}.input_layernorm.weight"
        if last not in shapes:
            raise CheckpointError(
                f"config.json says {self.text.num_hidden_layers} decoder layers but {last} is missing"
            )
        vlast = vp + f"encoder.layers.{self.vision.num_hidden_layers - 1}.layer_norm1.weight"
        if vlast not in shapes:
            raise CheckpointError(
                f"config.json says {self.vision.num_hidden_layers} vision layers but {vlast} is missing"
            )


def _rope_theta(t: Mapping[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters.
    rp = t.get("rope_parameters") or {}
    return t.get("rope_theta") or rp.get("rope_theta") or 10000.0
