"""Random-weight PaliGemma checkpoints at the official shapes, built directly in MLX (no torch).

    make_hf_folder(out, preset="pg2-3b-224", vision_layers=1, text_layers=1)   # layer cut
    make_hf_folder(out, preset="pg2-3b-224", narrow=True)                      # narrow-deep
    make_mlx_lm_folder(converted, out)      # the same decoder as a plain Gemma/Gemma2 LM

Presets carry the real widths, depths and the real 257216-row vocabulary; `vision_layers` /
`text_layers` cut the depth (widths and vocabulary kept: per-layer costs stay real), `narrow`
keeps the real depth and vocabulary but shrinks every width to 64 (per-layer, per-token
overhead dominates, the way it does on a GPU). The HF folder has the hub's "classic" key layout
(OIHW patch conv, no `format: mlx` marker), so `pg-edge convert` and mlx-vlm's converter both
read it. The tokenizer is the test suite's tiny SentencePiece model in the real PaliGemma id
layout (257152 pieces), so prompts tokenize to the real ids.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pg_edge.model.config import PaliGemmaConfig  # noqa: E402
from pg_edge.model.paligemma import PaliGemmaModel  # noqa: E402

VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              patch_size=14, model_type="siglip_vision_model", vision_use_head=False)
# (text model_type, D, layers, q heads, kv heads, head_dim, MLP width)
DECODERS = {
    "pg1-3b": ("gemma", 2048, 18, 8, 1, 256, 16384),
    "pg2-3b": ("gemma2", 2304, 26, 8, 4, 256, 9216),
    "pg2-10b": ("gemma2", 3584, 42, 16, 8, 256, 14336),
}
PRESETS = ["pg1-3b-224", "pg2-3b-224", "pg2-3b-448", "pg2-3b-896", "pg2-10b-224"]
VOCAB = 257216
NARROW = dict(width=64, mlp=128, heads=2, head_dim=32)


def config_raw(preset: str, vision_layers: int | None = None, text_layers: int | None = None,
               narrow: bool = False) -> dict:
    """An HF PaliGemma config.json for the preset, optionally depth-cut or narrow."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    name, size = preset.rsplit("-", 1)
    kind, D, L, N, K, H, F = DECODERS[name]
    vision = dict(VISION, image_size=int(size))
    if narrow:
        D, N, K, H, F = NARROW["width"], NARROW["heads"], 1, NARROW["head_dim"], NARROW["mlp"]
        vision.update(hidden_size=NARROW["width"], intermediate_size=NARROW["mlp"],
                      num_attention_heads=NARROW["heads"])
    text = dict(model_type=kind, hidden_size=D, num_hidden_layers=text_layers or L, num_attention_heads=N,
                num_key_value_heads=K, head_dim=H, intermediate_size=F, vocab_size=VOCAB,
                hidden_activation="gelu_pytorch_tanh", torch_dtype="bfloat16")
    if kind == "gemma2":
        text.update(query_pre_attn_scalar=H, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    sliding_window=4096, cache_implementation="hybrid")
    if vision_layers:
        vision["num_hidden_layers"] = vision_layers
    vision["num_image_tokens"] = (int(size) // 14) ** 2
    return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"],
                text_config=text, vision_config=vision, projection_dim=D, hidden_size=2048,
                image_token_index=257152, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                torch_dtype="bfloat16", transformers_version="4.47.0")


def random_tensor(key: str, shape: tuple, seed: int) -> mx.array:
    """bf16 weights of a plausible scale: matrices N(0, 1/fan_in), SigLIP LayerNorm weights 1,
    Gemma RMSNorm weights (offsets from 1) and biases 0, position table N(0, 0.02)."""
    if key.endswith(".bias"):
        return mx.zeros(shape, dtype=mx.bfloat16)
    if key.startswith("vision_tower") and ("layer_norm" in key or "post_layernorm" in key):
        return mx.ones(shape, dtype=mx.bfloat16)
    if "norm" in key:
        return mx.zeros(shape, dtype=mx.bfloat16)
    mx.random.seed(seed)
    std = 0.02 if "position_embedding" in key else (math.prod(shape[1:]) if "embed_tokens" not in key else shape[1]) ** -0.5
    return (mx.random.normal(shape) * std).astype(mx.bfloat16)


def make_hf_folder(out: Path, preset: str = "pg2-3b-224", vision_layers: int | None = None,
                   text_layers: int | None = None, narrow: bool = False, shard_gb: float = 2.0) -> Path:
    """Write a complete random HF PaliGemma folder (weights, config, tokenizer files)."""
    from fixtures.tokenizer import build_tokenizer, set_image_geometry

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    raw = config_raw(preset, vision_layers, text_layers, narrow)
    model = PaliGemmaModel(PaliGemmaConfig.from_dict(raw))  # lazy: shapes only
    shards, current, size, index = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(out / name), current, metadata={"format": "pt"})
            shards.append(name)
            index.update({k: name for k in current})
            current, size = {}, 0

    for i, (key, p) in enumerate(tree_flatten(model.parameters())):
        t = random_tensor(key, tuple(p.shape), seed=i)
        if key.endswith("patch_embedding.weight"):
            t = t.transpose(0, 3, 1, 2)  # MLX OHWI -> HF OIHW
        mx.eval(t)
        current[key] = t
        size += t.nbytes
        if size >= shard_gb * 1e9:
            flush()
    flush()
    index = {"metadata": {}, "weight_map": dict(sorted(index.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    tok = build_tokenizer(out / "_tok")
    for f in tok.iterdir():
        shutil.move(str(f), out / f.name)
    (out / "_tok").rmdir()
    size = raw["vision_config"]["image_size"]
    set_image_geometry(out, size, (size // 14) ** 2)
    return out


def make_mlx_lm_folder(converted: Path, out: Path) -> Path:
    """The decoder of a converted (float or quantized) pg_edge folder as an mlx-lm Gemma/Gemma2
    model folder: `language_model.model.*` -> `model.*`, same tensors, same quantization."""
    from pg_edge.checkpoint.folder import SIDE_FILES, iter_shards

    converted, out = Path(converted), Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    raw = json.loads((converted / "config.json").read_text())
    text = dict(raw["text_config"])
    tensors = {}
    for _, shard, _ in iter_shards(converted):
        for k, v in shard.items():
            if k.startswith("language_model."):
                tensors[k[len("language_model."):]] = v
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    cfg = dict(text, tie_word_embeddings=True)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("max_position_embeddings", 8192)
    if text["model_type"] == "gemma2":
        cfg.setdefault("query_pre_attn_scalar", cfg["head_dim"])
    q = raw.get("quantization")
    if q:
        section = {k[len("language_model."):] if k.startswith("language_model.") else k: v
                   for k, v in q.items() if not k.startswith(("vision_tower", "multi_modal"))}
        cfg["quantization"] = section
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in SIDE_FILES:
        if (converted / name).is_file() and name != "config.json":
            shutil.copy2(converted / name, out / name)
    return out
