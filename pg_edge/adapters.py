"""Adapters from `pg-edge finetune --export adapters`, applied to a freshly loaded base model.

    ADAPTERS/
        adapters.safetensors   what trained: LoRA's lora_a/lora_b, or the trained weights
        adapter_config.json    format, mode (lora/attn/full), LoRA rank/alpha/scale/targets, base
                               model name and architecture fingerprint (`base_fingerprint`)

The runtime reads them two ways: `pg_edge.load(model, adapters=ADAPTERS)` applies one folder to
the loaded base (`load_adapters`: mlx-lm's LoRALinear, or the trained weights put in place);
`pg_edge.load(model, adapters={"name": ADAPTERS, ...})` keeps the base shared and adds each LoRA
folder's factors by name (`lora_factors`, used by pg_edge.adapter_bank). Both check a folder
against its base first (`read_adapters`). pg_edge.train.export writes them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
from typing import TYPE_CHECKING

from .errors import PgEdgeError
from .safetensors_check import load_safetensors
from .paligemma import PaliGemmaModel

if TYPE_CHECKING:
    from .train.modes import ModeSpec

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# config.json fields that do not change what the weights mean: left out of the base fingerprint
# (a QLoRA adapter trained on a quantized base applies to its float base too).
_NOT_ARCHITECTURE = ("torch_dtype", "_name_or_path", "transformers_version", "architectures",
                     "quantization", "quantization_config")


def base_fingerprint(model: PaliGemmaModel) -> str:
    """16 hex digits identifying the base's architecture (config.json without dtype, names and
    quantization): adapters record it and are refused on a base with another one."""
    raw = {k: v for k, v in model.config.raw.items() if k not in _NOT_ARCHITECTURE}
    for sub in ("text_config", "vision_config"):
        if isinstance(raw.get(sub), dict):
            raw[sub] = {k: v for k, v in raw[sub].items() if k not in _NOT_ARCHITECTURE}
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_spec(folder: Path, config) -> "ModeSpec":
    """The ModeSpec of adapter_config.json, its LoRA settings checked (rank, alpha, dropout, and
    the recorded scale equal to alpha / rank); one-line PgEdgeError otherwise."""
    from .train.modes import ModeSpec  # LoRA layers: mlx-lm's tuner, only when asked

    where = folder / ADAPTER_CONFIG
    if not isinstance(config, dict) or config.get("format") != "pg_edge-adapters":
        raise PgEdgeError(f"{where} is not a pg-edge adapter config (no \"format\": \"pg_edge-adapters\")")
    lora = config.get("lora") or {}
    if not isinstance(lora, dict):
        raise PgEdgeError(f"{where}: \"lora\" must be an object, got {type(lora).__name__}")
    settings = {k: v for k, v in lora.items() if k != "scale"}
    for k, v in settings.items():
        if k not in ("rank", "alpha", "dropout") or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PgEdgeError(f"{where}: unexpected LoRA setting {k}={v!r}")
    try:
        spec = ModeSpec.from_dict({**config, "lora": settings})
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise PgEdgeError(f"{where}: not a valid adapter config ({type(err).__name__}: {err})") from None
    except PgEdgeError as err:
        raise PgEdgeError(f"{where}: {err}") from None
    scale = lora.get("scale")
    if spec.mode == "lora" and scale is not None and (
            not isinstance(scale, (int, float)) or abs(float(scale) - spec.lora.scale) > 1e-6 * abs(spec.lora.scale)):
        raise PgEdgeError(f"{where}: LoRA scale {scale!r} is not alpha / rank = {spec.lora.alpha} / "
                          f"{spec.lora.rank} (the file was edited?)")
    return spec


def read_adapters(folder: str | Path, model: PaliGemmaModel) -> tuple["ModeSpec", dict, dict]:
    """(spec, weights, config) of an adapter folder, checked against `model` without changing
    it: the config (format, mode, LoRA rank/alpha/dropout, scale = alpha / rank) and the base's
    architecture fingerprint when recorded. One-line PgEdgeError otherwise."""
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights, _ = load_safetensors(folder / ADAPTER_FILE)  # header checked in Python first
    except (OSError, ValueError, RuntimeError, RecursionError) as err:
        raise PgEdgeError(f"cannot read adapters in {folder}: {str(err).splitlines()[0]}") from None
    spec = _read_spec(folder, config)
    theirs, mine = config.get("base_fingerprint"), base_fingerprint(model)
    if theirs is not None and theirs != mine:
        raise PgEdgeError(f"adapters in {folder} were made for another base model "
                          f"({config.get('base_model') or 'unnamed'}, architecture {theirs}; this model's is "
                          f"{mine}); load them on the base they were trained on")
    return spec, weights, config


def lora_factors(folder: str | Path, model: PaliGemmaModel) -> tuple["ModeSpec", dict]:
    """A LoRA adapter folder read for sharing a base: (spec, {layer path: (A float[in, r],
    B float[r, out])}), every tensor's name and shape checked against the layers of `model`
    (which is not changed). attn/full adapters replace base weights and are refused."""
    from .multi_lora import MultiLoRALinear, dims
    from .train.modes import lora_targets

    folder = Path(folder)
    spec, weights, _ = read_adapters(folder, model)
    if spec.mode != "lora":
        raise PgEdgeError(f"adapters in {folder} are --train {spec.mode} (base weights replaced, not a "
                          "low-rank delta): only LoRA adapters share a base; load that one alone with "
                          "pg_edge.load(MODEL, adapters=DIR) or a fused folder")
    modules = dict(model.named_modules())
    paths = lora_targets(model, spec.freeze_vision)
    expected = {f"{p}.{k}" for p in paths for k in ("lora_a", "lora_b")}
    if set(weights) != expected:
        extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise PgEdgeError(f"{folder / ADAPTER_FILE} does not fit this model ({len(extra)} unexpected, "
                          f"{len(missing)} missing, e.g. {(extra or missing)[0]}); made for another base?")
    r = spec.lora.rank
    factors = {}
    for p in paths:
        layer = modules[p]
        inp, out = dims(layer.linear if isinstance(layer, MultiLoRALinear) else layer)
        a, b = weights[f"{p}.lora_a"], weights[f"{p}.lora_b"]
        for name, w, need in (("lora_a", a, (inp, r)), ("lora_b", b, (r, out))):
            if tuple(w.shape) != need:
                raise PgEdgeError(f"{folder / ADAPTER_FILE}: {p}.{name} has shape {tuple(w.shape)}, this model "
                                  f"needs {need} (adapters of another base, or rank {r} in the config does "
                                  "not match the weights)")
            if not mx.issubdtype(w.dtype, mx.floating):
                raise PgEdgeError(f"{folder / ADAPTER_FILE}: {p}.{name} has dtype {w.dtype}, not a float")
        factors[p] = (a, b)
    return spec, factors


def load_adapters(model: PaliGemmaModel, folder: str | Path) -> "ModeSpec":
    """Apply saved adapters (or trained weights) to a freshly loaded copy of their base model.

    Checked before the model changes: the config and fingerprint (`read_adapters`), then every
    tensor's name, shape and dtype against what the mode puts in this model (LoRA's a/b of the
    recorded rank)."""
    folder = Path(folder)
    spec, weights, _ = read_adapters(folder, model)
    from mlx.utils import tree_flatten

    from .train.modes import apply_mode

    trainable = set(apply_mode(model, spec))
    if set(weights) != trainable:
        extra, missing = sorted(set(weights) - trainable), sorted(trainable - set(weights))
        raise PgEdgeError(f"{folder / ADAPTER_FILE} does not fit this model ({len(extra)} unexpected, "
                          f"{len(missing)} missing, e.g. {(extra or missing)[0]}); made for another base?")
    have = dict(tree_flatten(model.trainable_parameters()))
    for k in sorted(weights):
        w, h = weights[k], have[k]
        if tuple(w.shape) != tuple(h.shape):
            raise PgEdgeError(f"{folder / ADAPTER_FILE}: {k} has shape {tuple(w.shape)}, this model needs "
                              f"{tuple(h.shape)} (adapters of another base, or rank {spec.lora.rank} "
                              "in the config does not match the weights)")
        if not mx.issubdtype(w.dtype, mx.floating) and w.dtype != h.dtype:
            raise PgEdgeError(f"{folder / ADAPTER_FILE}: {k} has dtype {w.dtype}, this model needs {h.dtype}")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    model.eval()
    return spec
