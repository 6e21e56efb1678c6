"""What pg_edge accepts in a `config.json`, checked before any value reaches the model.

`check_config(raw)` walks the fields PaliGemmaConfig reads and raises a CheckpointError naming
the field (`config.json: text_config.num_attention_heads must be an integer >= 1, got 0`), so a
zero head count, a string where a number belongs or an unknown activation is one clear sentence
instead of a ZeroDivisionError deep in the model. Fields pg_edge ignores are not checked.
`check_tokenizer_fits` compares the tokenizer with the config: every id the tokenizer can
produce must index the embedding, and both must agree on `<image>`.
"""
from __future__ import annotations

import math

from ..errors import CheckpointError

MAX_INT = 2**31 - 1  # MLX shapes and ids are int32
ACTIVATIONS = {"gelu", "gelu_python", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"}
LAYER_TYPES = {"sliding_attention", "full_attention"}
QUANT_BITS = {2, 3, 4, 5, 6, 8}
QUANT_GROUPS = {32, 64, 128}
QUANT_MODES = {"affine", "mxfp4", "mxfp8", "nvfp4"}


def _fail(field: str, want: str, got) -> CheckpointError:
    return CheckpointError(f"config.json: {field} must be {want}, got {str(got)[:60]!r}")


def _int(d: dict, key: str, field: str, low: int = 1, nullable: bool = False) -> None:
    if key not in d or (nullable and d[key] is None):
        return
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_INT:
        raise _fail(field, f"an integer >= {low}" + (" or null" if nullable else ""), v)


def _pos(d: dict, key: str, field: str, nullable: bool = False) -> None:
    """A finite number > 0."""
    if key not in d or (nullable and d[key] is None):
        return
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise _fail(field, "a finite number > 0" + (" or null" if nullable else ""), v)


def _choice(d: dict, key: str, field: str, allowed: set, nullable: bool = False) -> None:
    if key not in d or (nullable and d[key] is None):
        return
    v = d[key]
    if not any(type(v) is type(a) and v == a for a in allowed):  # 4.0, True, [] are not 4
        raise _fail(field, "one of " + ", ".join(map(str, sorted(allowed))), v)


def _section(raw: dict, key: str) -> dict:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(key, "an object", v)
    return v


def check_config(raw) -> None:
    """Raise CheckpointError naming the first field of `raw` pg_edge cannot use."""
    if not isinstance(raw, dict):
        raise CheckpointError("config.json must hold a JSON object")
    v, t = _section(raw, "vision_config"), _section(raw, "text_config")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "patch_size", "image_size"):
        _int(v, k, f"vision_config.{k}")
    if v.get("num_channels", 3) != 3:
        raise _fail("vision_config.num_channels", "3 (RGB)", v["num_channels"])
    _pos(v, "layer_norm_eps", "vision_config.layer_norm_eps")
    _choice(v, "hidden_act", "vision_config.hidden_act", ACTIVATIONS)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        _int(t, k, f"text_config.{k}")
    _int(t, "head_dim", "text_config.head_dim", nullable=True)
    _int(t, "sliding_window", "text_config.sliding_window", nullable=True)
    for k in ("rms_norm_eps", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping",
              "query_pre_attn_scalar"):
        _pos(t, k, f"text_config.{k}", nullable=k != "rms_norm_eps")
    _pos(_section(t, "rope_parameters"), "rope_theta", "text_config.rope_parameters.rope_theta", nullable=True)
    _choice(t, "hidden_activation", "text_config.hidden_activation", ACTIVATIONS, nullable=True)
    for k in ("projection_dim", "vocab_size"):
        _int(raw, k, k)
    for k in ("image_token_index", "image_token_id", "bos_token_id", "pad_token_id"):
        _int(raw, k, k, low=0)
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        if not eos:
            raise _fail("eos_token_id", "an integer or a non-empty list of integers", eos)
        _int({"e": eos[0]}, "e", "eos_token_id[0]", low=0)
    else:
        _int(raw, "eos_token_id", "eos_token_id", low=0)
    for d, name in ((raw, "tie_word_embeddings"), (t, "text_config.tie_word_embeddings")):
        key = name.split(".")[-1]
        if key in d and not isinstance(d[key], bool):
            raise _fail(name, "true or false", d[key])
    _check_consistency(raw, v, t)
    for key in ("quantization", "quantization_config"):
        if raw.get(key):
            _check_quantization(raw[key], key)


def _check_consistency(raw: dict, v: dict, t: dict) -> None:
    """Relations between fields that the model code relies on (defaults as config.py's)."""
    vh, vheads = v.get("hidden_size", 1152), v.get("num_attention_heads", 16)
    if vh % vheads:
        raise CheckpointError(f"config.json: vision_config.hidden_size {vh} is not a multiple of "
                              f"vision_config.num_attention_heads {vheads}")
    if v.get("image_size", 224) < v.get("patch_size", 14):
        raise CheckpointError("config.json: vision_config.image_size is smaller than vision_config.patch_size")
    heads = t.get("num_attention_heads", 8)
    kv = t.get("num_key_value_heads", heads)
    if heads % kv:
        raise CheckpointError(f"config.json: text_config.num_attention_heads {heads} is not a multiple of "
                              f"text_config.num_key_value_heads {kv}")
    if not t.get("head_dim") and t.get("hidden_size", raw.get("projection_dim", 2048)) < heads:
        raise CheckpointError("config.json: text_config.hidden_size is smaller than num_attention_heads")
    vocab = t.get("vocab_size", raw.get("vocab_size", 257216))
    for k in ("bos_token_id", "pad_token_id"):
        if raw.get(k, 0) >= vocab:
            raise _fail(k, f"below text_config.vocab_size {vocab}", raw[k])
    eos = raw.get("eos_token_id", 1)
    if (eos[0] if isinstance(eos, list) else eos) >= vocab:
        raise _fail("eos_token_id", f"below text_config.vocab_size {vocab}", eos)
    types = t.get("layer_types")
    if types is not None:
        layers = t.get("num_hidden_layers", 18)
        if not isinstance(types, list) or len(types) != layers or not all(
                isinstance(x, str) and x in LAYER_TYPES for x in types):
            raise _fail("text_config.layer_types", f"a list of {layers} of sliding_attention/full_attention",
                        types)


def _check_quantization(q, key: str) -> None:
    if not isinstance(q, dict):
        raise _fail(key, "an object", q)
    _choice(q, "bits", f"{key}.bits", QUANT_BITS)
    _choice(q, "group_size", f"{key}.group_size", QUANT_GROUPS)
    _choice(q, "mode", f"{key}.mode", QUANT_MODES)
    for name, sub in q.items():
        if name in ("bits", "group_size", "mode") or isinstance(sub, bool):
            continue
        if not isinstance(sub, dict):
            raise _fail(f"{key}.{name}", "an object or false", sub)
        _choice(sub, "bits", f"{key}.{name}.bits", QUANT_BITS)
        _choice(sub, "group_size", f"{key}.{name}.group_size", QUANT_GROUPS)
        _choice(sub, "mode", f"{key}.{name}.mode", QUANT_MODES)


def check_tokenizer_fits(tokenizer, config) -> None:
    """Every id the tokenizer emits must index the embedding; `<image>` ids must agree."""
    rows = config.text.vocab_size
    top = max(tokenizer.vocab_size, tokenizer.bos_id + 1, tokenizer.eos_id + 1, tokenizer.pad_id + 1)
    if top > rows:
        raise CheckpointError(f"the tokenizer has {top} ids but the embedding has {rows} rows "
                              "(text_config.vocab_size); tokenizer and weights do not belong together")
    if tokenizer.image_id != config.image_token_index:
        raise CheckpointError(f"config.json says image_token_index {config.image_token_index} but the "
                              f"tokenizer's <image> is {tokenizer.image_id}; fix config.json")
