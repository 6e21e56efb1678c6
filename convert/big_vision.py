"""big_vision PaliGemma 1/2 checkpoints (.npz, or split .npz.part*) -> a pg_edge converted folder.

The output is the same folder the HF converter writes (classic HF key names, MLX layouts,
an HF-style config.json, tokenizer and processor files), so a checkpoint converted from Kaggle's
.npz and one converted from the hub are interchangeable, and both load in mlx-vlm.

big_vision stores (research/anchors.md A8): keys `params/img/...` and `params/llm/...` (some
files lack the `params/` prefix), every layer's weights stacked on axis 0, attention and MLP as
einsum tensors, bfloat16 as raw `|V2` void. The rule tables below (VISION, EMBED, DECODER,
GATING_*, NORMS, FINAL) say, key by key, which classic HF tensor(s) each one becomes and how;
their symbolic shapes are checked before anything is written, with the dimensions read from the
tensors themselves (a big_vision file has no config):

    P patch, C colour channels, W SigLIP width, NP image tokens, Lv SigLIP layers, Hv x hv heads,
    Fv SigLIP MLP; V vocabulary, D decoder width, L layers, N q heads, K kv heads, H head dim,
    F MLP width.

Every key in the file must be used and every rule must find its key: anything else is a
CheckpointError naming the key, raised before the output folder exists. Memory stays near one
output shard: arrays are read one layer at a time (see convert/npz.py) and written shard by
shard (vision + projector, embeddings, groups of decoder layers) through FolderWriter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from pg_edge.model.config import IMAGE_TOKEN_INDEX, PaliGemmaConfig
from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.folder import FolderWriter, Progress
from pg_edge.checkpoint.output_check import check_output

from . import parse_dtype
from .hf import check_complete
from .npz import NpzArchive, check_float
from .side_files import tokenizer_files

VT = "vision_tower.vision_model."
ENC = VT + "encoder.layers.{i}."
LM = "language_model.model."
DEC = LM + "layers.{i}."
ATT = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
MLP = "img/Transformer/encoderblock/MlpBlock_0/"
HF_VOCAB_MULTIPLE = 64  # HF pads the embedding to 257216 rows: (257152 + 1) rounded up to 64

Transform = Callable[[mx.array, dict], mx.array]  # one (layer's) slice -> HF layout, MLX conv


# --- transforms: each undoes one big_vision layout, on one layer's slice ---------------------
def same(x, d):
    return x


def dense(x, d):  # flax Dense kernel (in, out) -> Linear weight (out, in)
    return x.T


def conv_hwio_to_ohwi(x, d):  # (P, P, C, W) -> MLX Conv2d (W, P, P, C)
    return x.transpose(3, 0, 1, 2)


def pos_rows(x, d):  # (1, NP, W) -> (NP, W)
    return x.reshape(d["NP"], d["W"])


def heads_in(x, d):  # (W, Hv, hv): per-head Dense -> (Hv*hv, W)
    return x.reshape(d["W"], -1).T


def heads_bias(x, d):  # (Hv, hv) -> (Hv*hv,)
    return x.reshape(-1)


def heads_out(x, d):  # (Hv, hv, W): merge heads -> (W, Hv*hv)
    return x.reshape(-1, d["W"]).T


def q_proj(x, d):  # q_einsum (N, D, H) -> (N*H, D), head-major rows like HF
    return x.transpose(0, 2, 1).reshape(-1, d["D"])


def k_proj(x, d):  # kv_einsum (2, K, D, H), [0] = keys -> (K*H, D)
    return x[0].transpose(0, 2, 1).reshape(-1, d["D"])


def v_proj(x, d):  # [1] = values
    return x[1].transpose(0, 2, 1).reshape(-1, d["D"])


def o_proj(x, d):  # attn_vec_einsum (N, H, D) -> (D, N*H)
    return x.transpose(2, 0, 1).reshape(d["D"], -1)


def gate(x, d):  # gating_einsum (2, D, F): gelu(x @ w[0]) * (x @ w[1]) -> (F, D)
    return x[0].T


def up(x, d):
    return x[1].T


def gate_fd(x, d):  # the same stored as (2, F, D) (big_vision's loader accepts both)
    return x[0]


def up_fd(x, d):
    return x[1]


def pad_vocab(x, d):
    """(V, D) -> (V_hf, D): HF's extra rows (`<image>` and padding) are never emitted; they get
    the mean embedding, as HF's converter does (minus its noise), so their logits stay average."""
    extra = d["V_hf"] - d["V"]
    if extra == 0:
        return x
    total = mx.zeros((x.shape[1],), dtype=mx.float32)
    for a in range(0, x.shape[0], 16384):  # chunked: no float32 copy of the whole table
        total = total + x[a:a + 16384].astype(mx.float32).sum(axis=0)
        mx.eval(total)
    mean = (total / x.shape[0]).astype(x.dtype)
    return mx.concatenate([x, mx.broadcast_to(mean, (extra, x.shape[1]))], axis=0)


@dataclass(frozen=True)
class Rule:
    """big_vision key (no `params/`) with its symbolic shape -> classic HF key(s) + transform.
    Templates with `{i}` are per layer: the key is stacked on axis 0 (Lv or L layers)."""

    key: str
    shape: tuple
    outputs: tuple[tuple[str, Transform], ...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.outputs[0][0]


def rule(key: str, shape: tuple, *outputs: tuple[str, Transform]) -> Rule:
    return Rule(key, shape, outputs)


VISION = [
    rule("img/embedding/kernel", ("P", "P", "C", "W"), (VT + "embeddings.patch_embedding.weight", conv_hwio_to_ohwi)),
    rule("img/embedding/bias", ("W",), (VT + "embeddings.patch_embedding.bias", same)),
    rule("img/pos_embedding", (1, "NP", "W"), (VT + "embeddings.position_embedding.weight", pos_rows)),
    rule("img/Transformer/encoderblock/LayerNorm_0/scale", ("Lv", "W"), (ENC + "layer_norm1.weight", same)),
    rule("img/Transformer/encoderblock/LayerNorm_0/bias", ("Lv", "W"), (ENC + "layer_norm1.bias", same)),
    rule("img/Transformer/encoderblock/LayerNorm_1/scale", ("Lv", "W"), (ENC + "layer_norm2.weight", same)),
    rule("img/Transformer/encoderblock/LayerNorm_1/bias", ("Lv", "W"), (ENC + "layer_norm2.bias", same)),
    rule(ATT + "query/kernel", ("Lv", "W", "Hv", "hv"), (ENC + "self_attn.q_proj.weight", heads_in)),
    rule(ATT + "query/bias", ("Lv", "Hv", "hv"), (ENC + "self_attn.q_proj.bias", heads_bias)),
    rule(ATT + "key/kernel", ("Lv", "W", "Hv", "hv"), (ENC + "self_attn.k_proj.weight", heads_in)),
    rule(ATT + "key/bias", ("Lv", "Hv", "hv"), (ENC + "self_attn.k_proj.bias", heads_bias)),
    rule(ATT + "value/kernel", ("Lv", "W", "Hv", "hv"), (ENC + "self_attn.v_proj.weight", heads_in)),
    rule(ATT + "value/bias", ("Lv", "Hv", "hv"), (ENC + "self_attn.v_proj.bias", heads_bias)),
    rule(ATT + "out/kernel", ("Lv", "Hv", "hv", "W"), (ENC + "self_attn.out_proj.weight", heads_out)),
    rule(ATT + "out/bias", ("Lv", "W"), (ENC + "self_attn.out_proj.bias", same)),
    rule(MLP + "Dense_0/kernel", ("Lv", "W", "Fv"), (ENC + "mlp.fc1.weight", dense)),
    rule(MLP + "Dense_0/bias", ("Lv", "Fv"), (ENC + "mlp.fc1.bias", same)),
    rule(MLP + "Dense_1/kernel", ("Lv", "Fv", "W"), (ENC + "mlp.fc2.weight", dense)),
    rule(MLP + "Dense_1/bias", ("Lv", "W"), (ENC + "mlp.fc2.bias", same)),
    rule("img/Transformer/encoder_norm/scale", ("W",), (VT + "post_layernorm.weight", same)),
    rule("img/Transformer/encoder_norm/bias", ("W",), (VT + "post_layernorm.bias", same)),
    # The ViT "head" is PaliGemma's connector: Dense(W -> D) on every image token.
    rule("img/head/kernel", ("W", "D"), ("multi_modal_projector.linear.weight", dense)),
    rule("img/head/bias", ("D",), ("multi_modal_projector.linear.bias", same)),
]
EMBED = [rule("llm/embedder/input_embedding", ("V", "D"), (LM + "embed_tokens.weight", pad_vocab))]
DECODER = [
    rule("llm/layers/attn/q_einsum/w", ("L", "N", "D", "H"), (DEC + "self_attn.q_proj.weight", q_proj)),
    rule("llm/layers/attn/kv_einsum/w", ("L", 2, "K", "D", "H"),
         (DEC + "self_attn.k_proj.weight", k_proj), (DEC + "self_attn.v_proj.weight", v_proj)),
    rule("llm/layers/attn/attn_vec_einsum/w", ("L", "N", "H", "D"), (DEC + "self_attn.o_proj.weight", o_proj)),
    rule("llm/layers/mlp/linear", ("L", "F", "D"), (DEC + "mlp.down_proj.weight", dense)),
    rule("llm/layers/pre_attention_norm/scale", ("L", "D"), (DEC + "input_layernorm.weight", same)),
]
GATING = "llm/layers/mlp/gating_einsum"
GATING_DF = rule(GATING, ("L", 2, "D", "F"), (DEC + "mlp.gate_proj.weight", gate), (DEC + "mlp.up_proj.weight", up))
GATING_FD = rule(GATING, ("L", 2, "F", "D"), (DEC + "mlp.gate_proj.weight", gate_fd),
                 (DEC + "mlp.up_proj.weight", up_fd))
# The norm-name trap: big_vision's pre_ffw_norm is HF Gemma's post_attention_layernorm but HF
# Gemma2's pre_feedforward_layernorm (Gemma2 adds norms after attention and after the MLP).
NORMS = {
    1: [rule("llm/layers/pre_ffw_norm/scale", ("L", "D"), (DEC + "post_attention_layernorm.weight", same))],
    2: [rule("llm/layers/pre_ffw_norm/scale", ("L", "D"), (DEC + "pre_feedforward_layernorm.weight", same)),
        rule("llm/layers/post_attention_norm/scale", ("L", "D"), (DEC + "post_attention_layernorm.weight", same)),
        rule("llm/layers/post_ffw_norm/scale", ("L", "D"), (DEC + "post_feedforward_layernorm.weight", same))],
}
FINAL = [rule("llm/final_norm/scale", ("D",), (LM + "norm.weight", same))]

# Where each dimension is read: (symbol, key, axis). The rules' shape checks then catch any
# tensor that disagrees with these.
DIM_SOURCES = [
    ("P", "img/embedding/kernel", 0), ("C", "img/embedding/kernel", 2), ("W", "img/embedding/kernel", 3),
    ("NP", "img/pos_embedding", 1), ("Lv", "img/Transformer/encoderblock/LayerNorm_0/scale", 0),
    ("Hv", ATT + "query/kernel", 2), ("hv", ATT + "query/kernel", 3), ("Fv", MLP + "Dense_0/kernel", 2),
    ("V", "llm/embedder/input_embedding", 0), ("D", "llm/embedder/input_embedding", 1),
    ("L", "llm/layers/attn/q_einsum/w", 0), ("N", "llm/layers/attn/q_einsum/w", 1),
    ("H", "llm/layers/attn/q_einsum/w", 3), ("K", "llm/layers/attn/kv_einsum/w", 2),
    ("F", "llm/layers/mlp/linear", 1),
]


class Checkpoint:
    """An open big_vision .npz with `params/` stripped from its keys; `shapes` and `read`."""

    def __init__(self, path: str | Path):
        self.npz = NpzArchive(path)
        try:
            self._index()
        except BaseException:
            self.npz.close()
            raise

    def _index(self) -> None:
        self.name = self.npz.name
        self.keys: dict[str, str] = {}  # short key -> key in the file
        for k in self.npz.keys():
            short = k[len("params/"):] if k.startswith("params/") else k
            if short in self.keys:
                raise CheckpointError(f"{self.name} has both {k} and {self.keys[short]}")
            self.keys[short] = k
        if not any(k.startswith(("img/", "llm/")) for k in self.keys):
            sample = ", ".join(sorted(self.npz.keys())[:3]) or "none"
            raise CheckpointError(f"{self.name} is not a big_vision PaliGemma checkpoint: no "
                                  f"params/img/... or params/llm/... keys (found {sample})")
        self.shapes = {k: self.npz.shape(v) for k, v in self.keys.items()}
        self.prefix = "params/" if any(k.startswith("params/") for k in self.npz.keys()) else ""
        for v in self.keys.values():
            check_float(self.npz.dtype(v), v)

    def read(self, key: str, index: int | None = None) -> mx.array:
        x = self.npz.read(self.keys[key], index)
        return x if isinstance(x, mx.array) else mx.array(x)

    def close(self) -> None:
        self.npz.close()


def read_dims(shapes: dict[str, tuple], prefix: str = "params/") -> dict[str, int]:
    dims = {}
    for sym, key, axis in DIM_SOURCES:
        if key not in shapes:
            raise CheckpointError(f"missing key {prefix}{key}")
        if len(shapes[key]) <= axis:
            raise CheckpointError(f"{prefix}{key} has shape {shapes[key]}, expected at least {axis + 1} axes")
        dims[sym] = int(shapes[key][axis])
    dims["V_hf"] = -(-(dims["V"] + 1) // HF_VOCAB_MULTIPLE) * HF_VOCAB_MULTIPLE
    return dims


def plan(shapes: dict[str, tuple], prefix: str = "params/") -> tuple[int, dict[str, int], list[Rule]]:
    """(PaliGemma version, dims, rules) after checking every key and shape of the file.
    shapes: keys without `params/`; prefix: how the file spells them, for the messages."""
    version = 2 if "llm/layers/post_attention_norm/scale" in shapes else 1
    dims = read_dims(shapes, prefix)
    stored_fd = tuple(shapes.get(GATING, ()))[2:] == (dims["F"], dims["D"]) and dims["F"] != dims["D"]
    gating = GATING_FD if stored_fd else GATING_DF
    rules = VISION + EMBED + DECODER + [gating] + NORMS[version] + FINAL
    wanted = {r.key for r in rules}
    for key in sorted(shapes):
        if key not in wanted:
            raise CheckpointError(f"unknown key {prefix}{key} {shapes[key]}: not part of a PaliGemma "
                                  f"{version} checkpoint (or not supported by this converter)")
    for r in rules:
        if r.key not in shapes:
            raise CheckpointError(f"missing key {prefix}{r.key} (PaliGemma {version} checkpoint)")
        want = tuple(dims[s] if isinstance(s, str) else s for s in r.shape)
        if tuple(shapes[r.key]) != want:
            named = "(" + ", ".join(map(str, r.shape)) + ")"
            raise CheckpointError(f"{prefix}{r.key} has shape {tuple(shapes[r.key])}, expected {want} = {named}")
    side = math.isqrt(dims["NP"])
    if side * side != dims["NP"]:
        raise CheckpointError(f"{prefix}img/pos_embedding has {dims['NP']} positions, not a square grid")
    if dims["V"] != IMAGE_TOKEN_INDEX:
        raise CheckpointError(f"{prefix}llm/embedder/input_embedding has {dims['V']} rows; PaliGemma's "
                              f"vocabulary has {IMAGE_TOKEN_INDEX}")
    return version, dims, rules


def hf_config(version: int, dims: dict[str, int], dtype: str, text_overrides: dict | None = None) -> dict:
    """The config.json HF's converter would write for these dimensions."""
    image_size = math.isqrt(dims["NP"]) * dims["P"]
    text = dict(
        model_type="gemma" if version == 1 else "gemma2", hidden_size=dims["D"], intermediate_size=dims["F"],
        num_hidden_layers=dims["L"], num_attention_heads=dims["N"], num_key_value_heads=dims["K"],
        head_dim=dims["H"], vocab_size=dims["V_hf"], rms_norm_eps=1e-6, rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, num_image_tokens=dims["NP"],
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True, torch_dtype=dtype,
    )
    if version == 2:
        text.update(
            architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            # big_vision's gemma2_27b scales queries by (D / N)**-0.5 = 144**-0.5
            # ("rsqrt_emb_per_head"); the 2B and 9B by head_dim**-0.5.
            query_pre_attn_scalar=dims["D"] // dims["N"] if dims["D"] == 4608 else dims["H"],
            sliding_window=4096, cache_implementation="hybrid",
        )
    text.update(text_overrides or {})
    vision = dict(
        model_type="siglip_vision_model", hidden_size=dims["W"], intermediate_size=dims["Fv"],
        num_hidden_layers=dims["Lv"], num_attention_heads=dims["Hv"], patch_size=dims["P"],
        image_size=image_size, num_channels=dims["C"], num_image_tokens=dims["NP"], projection_dim=dims["D"],
        projector_hidden_act="gelu_fast", vision_use_head=False, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )
    return dict(
        architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
        # The true D (HF's PaliGemma 2 configs say a stale 2048 here; mlx-vlm divides by it).
        hidden_size=dims["D"], projection_dim=dims["D"], vocab_size=dims["V_hf"],
        image_token_index=IMAGE_TOKEN_INDEX, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True, torch_dtype=dtype, text_config=text, vision_config=vision,
    )


def shard_plan(rules: list[Rule], dims: dict, itemsize: int, max_bytes: int) -> list[tuple[str, list]]:
    """[(label, [(rule, layer index or None), ...]), ...]: one shard for SigLIP + connector, one
    for the embeddings, then groups of whole decoder layers under max_bytes (the last one also
    holds the final norm). Layer-major inside a group: each layer is read once, in order."""
    def items(rs, layer):
        return [(r, layer if r.stacked else None) for r in rs]

    vision = [(r, i) for r in VISION for i in (range(dims["Lv"]) if r.stacked else [None])]
    shards = [("vision + connector", vision), ("embeddings", items(EMBED, None))]
    layered = [r for r in rules if r.key.startswith("llm/layers/")]
    per_layer = itemsize * sum(math.prod(dims[s] if isinstance(s, str) else s for s in r.shape[1:]) for r in layered)
    step = max(1, max_bytes // max(per_layer, 1))
    for a in range(0, dims["L"], step):
        layers = range(a, min(a + step, dims["L"]))
        group = [it for i in layers for it in items(layered, i)]
        if layers[-1] == dims["L"] - 1:
            group += items(FINAL, None)
        shards.append((f"decoder layers {layers[0]}-{layers[-1]}", group))
    return shards


def convert_big_vision(src: str | Path, out: str | Path, *, dtype: str = "bfloat16", force: bool = False,
                       tokenizer: str | Path | None = None, text_overrides: dict | None = None,
                       max_shard_bytes: int = 2 << 30, quiet: bool = False) -> Path:
    """Convert a big_vision .npz (or the first / any of its .npz.part* files) to `out`.

    tokenizer: `tokenizer.model` (or big_vision's paligemma_tokenizer.model, or a folder with
    one); default: one of those names beside the .npz. text_overrides: text_config values to
    override (e.g. `final_logit_softcapping` for a model fine-tuned without it).
    Raises CheckpointError naming the key on a missing, unknown or misshapen tensor.
    """
    target = parse_dtype(dtype)
    check_output(out, force, kind="model", inputs=[src, tokenizer])  # before the .npz is opened
    ckpt = Checkpoint(src)
    inputs = [src, tokenizer, *ckpt.npz.files]
    try:
        check_output(out, force, kind="model", inputs=inputs)  # every part of a split checkpoint
        version, dims, rules = plan(ckpt.shapes, ckpt.prefix)
        config = hf_config(version, dims, dtype, text_overrides)
        PaliGemmaConfig.from_dict(config)  # fails now on bad overrides, not after the writing
        with tokenizer_files(ckpt.npz.files[0], tokenizer, config) as side:
            shards = shard_plan(rules, dims, target.size, max_shard_bytes)
            progress = Progress(len(shards), "convert", quiet)
            used: set[str] = set()
            with FolderWriter(out, force=force, source=str(src), converter="big_vision",
                              inputs=inputs) as writer:
                for n, (label, items) in enumerate(shards, 1):
                    tensors: dict[str, mx.array] = {}
                    for r, i in items:
                        x = ckpt.read(r.key, i)
                        for template, fn in r.outputs:
                            tensors[template.format(i=i)] = fn(x, dims).astype(target)
                        used.add(r.key)
                    writer.add_shard(tensors)
                    progress.update(n, label, writer.nbytes)
                    del tensors, x
                unused = sorted(set(ckpt.shapes) - used)
                if unused:  # cannot happen when plan() passed; guards the loop above
                    raise CheckpointError(f"key {ckpt.prefix}{unused[0]} was not converted")
                shapes = writer.shapes()
                pg_config = PaliGemmaConfig.from_dict(config)
                pg_config.adopt_vision_mlp_width(shapes)
                pg_config.check_shapes(shapes)
                check_complete(pg_config, shapes, tie=True)
                return writer.finish(config, extra_files=side)
    finally:
        ckpt.close()
