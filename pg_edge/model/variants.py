"""The official PaliGemma variants as configs, and their parameter counts computed from them.

    official_config("pg2-10b", 448)      # a config.json dict of PaliGemma 2 10B at 448 px
    parameter_counts(official_config("pg1-3b", 224))   # {"vision": ..., "connector": ..., ...}
    print(markdown_table())              # the table in docs/architecture.md

Counts come from building the model pg_edge runs (`PaliGemmaModel`, nothing evaluated: MLX is
lazy, so no memory is allocated) and adding up its parameter shapes, per component
(pg_edge.checkpoint.weights.component). The three resolutions of one size differ only in SigLIP's position
embedding table, (S / 14)^2 rows of 1152: 256, 1024 or 4096. Hugging Face checkpoints pad the
vocabulary to 257216 rows; with the 257152 real rows (what keras-hub keeps) the counts are the
ones keras-hub publishes (tests/docs/test_figures.py checks them).
"""
from __future__ import annotations

import math

from .config import PaliGemmaConfig
from ..checkpoint.weights import component

# SigLIP So400m/14, the same in every variant.
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              patch_size=14, model_type="siglip_vision_model")
# name -> (text model_type, D, layers, q heads, kv heads, head_dim, MLP width, query_pre_attn_scalar)
DECODERS = {
    "pg1-3b": ("gemma", 2048, 18, 8, 1, 256, 16384, None),
    "pg2-3b": ("gemma2", 2304, 26, 8, 4, 256, 9216, 256),
    "pg2-10b": ("gemma2", 3584, 42, 16, 8, 256, 14336, 256),
    "pg2-28b": ("gemma2", 4608, 46, 32, 16, 128, 36864, 144),
}
RESOLUTIONS = (224, 448, 896)
HF_VOCAB = 257216  # the HF embedding's rows (257152 real ids, padded to a multiple of 64)
REAL_VOCAB = 257152
COMPONENTS = ("vision", "connector", "decoder", "embed")


def official_config(name: str, image_size: int, *, vocab: int = HF_VOCAB, vision_layers: int | None = None,
                    text_layers: int | None = None) -> dict:
    """A config.json dict of an official variant ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b") at
    `image_size` 224 / 448 / 896; vision_layers / text_layers cut the depth (benchmarks)."""
    kind, D, L, N, K, H, F, qs = DECODERS[name]
    text = dict(model_type=kind, hidden_size=D, num_hidden_layers=text_layers or L, num_attention_heads=N,
                num_key_value_heads=K, head_dim=H, intermediate_size=F, vocab_size=vocab)
    if qs is not None:
        text["query_pre_attn_scalar"] = qs
    vision = dict(VISION, image_size=int(image_size))
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    return dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=D,
                torch_dtype="bfloat16")


def parameter_counts(raw: dict) -> dict[str, int]:
    """Parameters per component of the model a config describes (tied LM head: counted once,
    in embed)."""
    from mlx.utils import tree_flatten

    from .paligemma import PaliGemmaModel

    model = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))
    out = {c: 0 for c in COMPONENTS}
    for key, value in tree_flatten(model.parameters()):
        out[component(key)] += math.prod(value.shape)
    return out


def variants() -> list[tuple[str, int]]:
    """Every official (size, resolution): PaliGemma 1 3B and PaliGemma 2 3B/10B/28B, each at
    224, 448 and 896 px."""
    return [(name, size) for name in DECODERS for size in RESOLUTIONS]


def markdown_table(vocab: int = REAL_VOCAB) -> str:
    """Parameter counts of every variant as a Markdown table (vocab: embedding rows counted)."""
    rows = ["| variant | px | image tokens | SigLIP | connector | decoder | embeddings | total |",
            "|---|---|---|---|---|---|---|---|"]
    for name, px in variants():
        c = parameter_counts(official_config(name, px, vocab=vocab))
        version, size_b = name.split("-")
        label = f"PaliGemma {version[2]} {size_b.upper()}"
        rows.append(f"| {label} | {px} | {(px // 14) ** 2} | {c['vision']:,} | {c['connector']:,} | "
                    f"{c['decoder']:,} | {c['embed']:,} | {sum(c.values()):,} |")
    return "\n".join(rows)
