"""Adapters: what trains in the three fine-tuning modes, and applying saved adapters at load.

    ADAPTERS/  (written by `pg-edge finetune --export adapters`, pg_edge.train.export)
        adapters.safetensors   what trained: LoRA's lora_a/lora_b, or the trained weights
        adapter_config.json    format, mode (lora/attn/full), LoRA rank/alpha/scale/targets, base
                               model name and architecture fingerprint (`base_fingerprint`)

The runtime applies them with `load_adapters` (`pg_edge.load(model, adapters=ADAPTERS)`): the
same `apply_mode` the trainer starts from, then the saved weights. The LoRA layers are mlx-lm's
(mlx_lm.tuner), imported with this module, which pg_edge.load imports only for adapters.

The modes:

    attn   the decoder's attention projections q/k/v/o in every layer, nothing else: the
           big_vision recipe (`llm/layers/attn/*`, ~170M of PaliGemma 1's 3B; SGD lr 0.03).
           Vision tower and connector stay frozen whatever `freeze_vision` says.
    lora   low-rank adapters (mlx-lm's LoRALinear, on nn.Linear or nn.QuantizedLinear: QLoRA
           on a quantized base) on every linear layer of the decoder (q/k/v/o, gate/up/down)
           and on the connector; also on every SigLIP linear (q/k/v/out_proj, fc1/fc2) unless
           `freeze_vision`. Only the adapters train; the base weights never change, so the
           adapters alone are a complete export. Embeddings, LM head and norms stay as they are.
    full   every parameter (vision, connector, decoder, tied embeddings/head, norms); with
           `freeze_vision` the SigLIP tower is frozen and the connector still trains.

`freeze_vision` freezes SigLIP only, not the connector (big_vision's `freeze_vit` also freezes
its `img/head`, the connector): the connector is one small matrix and is where the image
features meet a decoder that is itself changing, so letting it adapt is cheap. Freezing the
image encoder "does not significantly affect transfer results" (PaliGemma paper, section on
freezing), which makes it the memory-saving choice for `lora` and `full`.

attn and full train weights in place and so need a float base; a quantized base takes lora.
Trainable parameters are kept in float32 (big_vision trains f32 copies of a 16-bit model): SGD
steps of lr * grad are far below bf16's resolution of a weight. Exports cast them back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._mlx_lm import LoRALinear
from .errors import PgEdgeError
from .model.paligemma import PaliGemmaModel
from .checkpoint.safetensors_check import load_safetensors

MODES = ("attn", "lora", "full")
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VISION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "mlp.fc1", "mlp.fc2")
CONNECTOR = "multi_modal_projector.linear"
LORA_KEYS = ("lora_a", "lora_b")
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """rank r, alpha (the update is scaled by alpha / r, the usual convention; mlx-lm calls the
    ratio `scale`), dropout on the adapters' input."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise PgEdgeError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise PgEdgeError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise PgEdgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModeSpec:
    mode: str = "lora"
    freeze_vision: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if self.mode not in MODES:
            raise PgEdgeError(f"training mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.mode != "lora":
            d.pop("lora")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModeSpec":
        return cls(d["mode"], bool(d.get("freeze_vision", False)), LoraSettings(**(d.get("lora") or {})))


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or "scales" in module


def lora_targets(model: PaliGemmaModel, freeze_vision: bool) -> list[str]:
    """Module paths that get adapters in `lora` mode."""
    paths = [f"language_model.model.layers.{i}.{name}"
             for i in range(len(model.language_model.model.layers)) for name in DECODER_LINEARS]
    paths.append(CONNECTOR)
    if not freeze_vision:
        n = len(model.vision_tower.vision_model.encoder.layers)
        paths += [f"vision_tower.vision_model.encoder.layers.{i}.{name}"
                  for i in range(n) for name in VISION_LINEARS]
    return paths


def _refuse_quantized(model: nn.Module, prefix: str, mode: str) -> None:
    for path, m in model.named_modules():
        if path.startswith(prefix) and is_quantized(m) and not isinstance(m, LoRALinear):
            raise PgEdgeError(
                f"--train {mode} updates weights in place, but {path} is quantized; "
                "use --train lora (QLoRA) on a quantized model, or a float model for attn/full")


def apply_mode(model: PaliGemmaModel, spec: ModeSpec, master_dtype: mx.Dtype = mx.float32) -> list[str]:
    """Freeze / add adapters for `spec`; returns the sorted names of the trainable parameters.

    Adapter initialisation draws from MLX's global RNG: seed it first for a repeatable run."""
    model.freeze()
    layers = model.language_model.model.layers
    if spec.mode == "attn":
        _refuse_quantized(model, "language_model.model.layers.", "attn")
        for layer in layers:
            layer.self_attn.unfreeze()
    elif spec.mode == "full":
        _refuse_quantized(model, "" if not spec.freeze_vision else "language_model", "full")
        if spec.freeze_vision:
            _refuse_quantized(model, CONNECTOR, "full")
        model.unfreeze()
        if spec.freeze_vision:
            model.vision_tower.freeze()
    else:
        modules = dict(model.named_modules())
        swaps = []
        for path in lora_targets(model, spec.freeze_vision):
            base = modules[path]
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise PgEdgeError(f"cannot put LoRA on {path}: {type(base).__name__} is not a linear layer")
            swaps.append((path, LoRALinear.from_base(base, r=spec.lora.rank, dropout=spec.lora.dropout,
                                                     scale=spec.lora.scale)))
        model.update_modules(tree_unflatten(swaps))
        model.freeze()
        for _, m in swaps:
            m.unfreeze(keys=list(LORA_KEYS), recurse=False)
    # f32 master copies of 16-bit trainable weights.
    low = [(k, v.astype(master_dtype)) for k, v in tree_flatten(model.trainable_parameters())
           if mx.issubdtype(v.dtype, mx.floating) and v.dtype != master_dtype]
    if low:
        model.update(tree_unflatten(low))
    return trainable_names(model)


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(k for k, _ in tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    params = model.trainable_parameters() if trainable else model.parameters()
    return sum(v.size for _, v in tree_flatten(params))


def base_dtype(model: PaliGemmaModel) -> mx.Dtype:
    """The float dtype the model was loaded in: the connector bias (never quantized). Read it
    before `apply_mode`, which upcasts trainable parameters."""
    lin = model.multi_modal_projector.linear
    lin = lin.linear if isinstance(lin, LoRALinear) else lin
    return lin.bias.dtype


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


def _read_spec(folder: Path, config) -> ModeSpec:
    """The ModeSpec of adapter_config.json, its LoRA settings checked (rank, alpha, dropout, and
    the recorded scale equal to alpha / rank); one-line PgEdgeError otherwise."""
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


def load_adapters(model: PaliGemmaModel, folder: str | Path) -> ModeSpec:
    """Apply saved adapters (or trained weights) to a freshly loaded copy of their base model.

    Checked before the model changes: the config (format, mode, LoRA rank/alpha/dropout, scale
    = alpha / rank), the base's architecture fingerprint when recorded, then every tensor's name,
    shape and dtype against what the mode puts in this model (LoRA's a/b of the recorded rank)."""
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
