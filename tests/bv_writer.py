"""Write a tiny HF PaliGemma fixture's weights as a big_vision .npz, in big_vision's exact layout.

The inverse of big_vision -> HF, written by hand from research/anchors.md A8 (NOT by calling
convert/big_vision.py, whose mapping the tests check against this one):

    HF (classic names)                          big_vision (`params/` + ...)      layout
    patch_embedding.weight (W, C, P, P) OIHW    img/embedding/kernel             (P, P, C, W) HWIO
    position_embedding.weight (NP, W)           img/pos_embedding                (1, NP, W)
    layers.i.self_attn.{q,k,v}_proj.weight      .../MultiHeadDotProductAttention_0/{query,key,value}/kernel
        (Hv*hv, W)                                                               (Lv, W, Hv, hv)
    layers.i.self_attn.out_proj.weight (W, Hv*hv)   .../out/kernel               (Lv, Hv, hv, W)
    layers.i.mlp.fc1 / fc2 .weight              .../MlpBlock_0/Dense_0|1/kernel  (Lv, in, out)
    multi_modal_projector.linear.weight (D, W)  img/head/kernel                  (W, D)
    embed_tokens.weight (257216, D)             llm/embedder/input_embedding     (257152, D)
    q_proj (N*H, D)                             llm/layers/attn/q_einsum/w       (L, N, D, H)
    k_proj, v_proj (K*H, D)                     llm/layers/attn/kv_einsum/w      (L, 2, K, D, H)
    o_proj (D, N*H)                             llm/layers/attn/attn_vec_einsum/w (L, N, H, D)
    gate_proj, up_proj (F, D)                   llm/layers/mlp/gating_einsum     (L, 2, D, F)
    down_proj (D, F)                            llm/layers/mlp/linear            (L, F, D)
    norms, Gemma1: input_layernorm -> pre_attention_norm, post_attention_layernorm -> pre_ffw_norm
           Gemma2: + pre_feedforward_layernorm -> pre_ffw_norm,
                   post_attention_layernorm -> post_attention_norm, post_feedforward -> post_ffw_norm

Storage options: float32, float16, or bfloat16 as raw `|V2` void (as big_vision saves it), with
or without the `params/` prefix, and split into `.npz.partN` files like the 28B checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

VOCAB = 257152  # big_vision's embedding rows (HF pads to 257216)
ENC = "img/Transformer/encoderblock/"
ATT = ENC + "MultiHeadDotProductAttention_0/"


def read_hf(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Classic-layout HF fixture folder -> ({classic key: float32 array}, config.json)."""
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors, json.loads((Path(folder) / "config.json").read_text())


def bv_arrays(hf_folder: Path, gating_fd: bool = False) -> dict[str, np.ndarray]:
    """{big_vision key without `params/`: float32 array} holding the HF fixture's weights.
    gating_fd stores gating_einsum as (L, 2, F, D), the other orientation big_vision accepts."""
    w, cfg = read_hf(hf_folder)
    vc, tc = cfg["vision_config"], cfg["text_config"]
    gemma2 = tc["model_type"] == "gemma2"
    W, Hv = vc["hidden_size"], vc["num_attention_heads"]
    hv = W // Hv
    D, N, K, H = tc["hidden_size"], tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    v, t = "vision_tower.vision_model.", "language_model.model."
    enc = [f"{v}encoder.layers.{i}." for i in range(vc["num_hidden_layers"])]
    dec = [f"{t}layers.{i}." for i in range(tc["num_hidden_layers"])]

    def stack(layers, name, fn=lambda a: a):
        return np.stack([fn(w[p + name]) for p in layers])

    out = {
        "img/embedding/kernel": w[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": w[v + "embeddings.patch_embedding.bias"],
        "img/pos_embedding": w[v + "embeddings.position_embedding.weight"][None],
        ENC + "LayerNorm_0/scale": stack(enc, "layer_norm1.weight"),
        ENC + "LayerNorm_0/bias": stack(enc, "layer_norm1.bias"),
        ENC + "LayerNorm_1/scale": stack(enc, "layer_norm2.weight"),
        ENC + "LayerNorm_1/bias": stack(enc, "layer_norm2.bias"),
        ATT + "out/kernel": stack(enc, "self_attn.out_proj.weight", lambda a: a.T.reshape(Hv, hv, W)),
        ATT + "out/bias": stack(enc, "self_attn.out_proj.bias"),
        ENC + "MlpBlock_0/Dense_0/kernel": stack(enc, "mlp.fc1.weight", lambda a: a.T),
        ENC + "MlpBlock_0/Dense_0/bias": stack(enc, "mlp.fc1.bias"),
        ENC + "MlpBlock_0/Dense_1/kernel": stack(enc, "mlp.fc2.weight", lambda a: a.T),
        ENC + "MlpBlock_0/Dense_1/bias": stack(enc, "mlp.fc2.bias"),
        "img/Transformer/encoder_norm/scale": w[v + "post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": w[v + "post_layernorm.bias"],
        "img/head/kernel": w["multi_modal_projector.linear.weight"].T,
        "img/head/bias": w["multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": w[t + "embed_tokens.weight"][:VOCAB],
        "llm/layers/attn/q_einsum/w": stack(dec, "self_attn.q_proj.weight",
                                            lambda a: a.reshape(N, H, D).transpose(0, 2, 1)),
        "llm/layers/attn/kv_einsum/w": np.stack([
            np.stack([w[p + f"self_attn.{x}_proj.weight"].reshape(K, H, D).transpose(0, 2, 1) for x in "kv"])
            for p in dec]),
        "llm/layers/attn/attn_vec_einsum/w": stack(dec, "self_attn.o_proj.weight",
                                                   lambda a: a.reshape(D, N, H).transpose(1, 2, 0)),
        "llm/layers/mlp/gating_einsum": np.stack([
            np.stack([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]) if gating_fd else
            np.stack([w[p + "mlp.gate_proj.weight"].T, w[p + "mlp.up_proj.weight"].T]) for p in dec]),
        "llm/layers/mlp/linear": stack(dec, "mlp.down_proj.weight", lambda a: a.T),
        "llm/layers/pre_attention_norm/scale": stack(dec, "input_layernorm.weight"),
        "llm/final_norm/scale": w[t + "norm.weight"],
    }
    for x, bv in (("query", "q"), ("key", "k"), ("value", "v")):
        out[ATT + f"{x}/kernel"] = stack(enc, f"self_attn.{bv}_proj.weight", lambda a: a.T.reshape(W, Hv, hv))
        out[ATT + f"{x}/bias"] = stack(enc, f"self_attn.{bv}_proj.bias", lambda a: a.reshape(Hv, hv))
    if gemma2:
        out["llm/layers/pre_ffw_norm/scale"] = stack(dec, "pre_feedforward_layernorm.weight")
        out["llm/layers/post_attention_norm/scale"] = stack(dec, "post_attention_layernorm.weight")
        out["llm/layers/post_ffw_norm/scale"] = stack(dec, "post_feedforward_layernorm.weight")
    else:
        out["llm/layers/pre_ffw_norm/scale"] = stack(dec, "post_attention_layernorm.weight")
    return {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in out.items()}


def to_bf16_void(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) viewed as `|V2`, as big_vision saves."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view("V2")


def bf16_void_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def write_npz(arrays: dict[str, np.ndarray], path: Path, dtype: str = "float32", prefix: bool = True,
              parts: int = 0) -> list[Path]:
    """Save `arrays` (float32) as big_vision does; returns the written file(s).

    dtype: float32 | float16 | bfloat16 (stored as |V2). parts > 1 splits the bytes of the .npz
    into `path.part0`, `path.part1`, ... and removes `path`.
    """
    cast = {"float32": lambda a: a.astype(np.float32), "float16": lambda a: a.astype(np.float16),
            "bfloat16": to_bf16_void}[dtype]
    path = Path(path)
    np.savez(path, **{("params/" if prefix else "") + k: cast(a) for k, a in arrays.items()})
    if parts <= 1:
        return [path]
    data = path.read_bytes()
    path.unlink()
    cuts = np.linspace(0, len(data), parts + 1).astype(int)
    files = []
    for n in range(parts):
        f = path.with_name(f"{path.name}.part{n}")
        f.write_bytes(data[cuts[n]:cuts[n + 1]])
        files.append(f)
    return files


def write_bv_checkpoint(hf_folder: Path, path: Path, *, dtype: str = "float32", prefix: bool = True,
                        parts: int = 0, gating_fd: bool = False, tokenizer: bool = True) -> list[Path]:
    """The HF fixture as a big_vision .npz at `path` (+ tokenizer.model beside it)."""
    files = write_npz(bv_arrays(hf_folder, gating_fd), path, dtype=dtype, prefix=prefix, parts=parts)
    if tokenizer:
        (Path(path).parent / "tokenizer.model").write_bytes((Path(hf_folder) / "tokenizer.model").read_bytes())
    return files
