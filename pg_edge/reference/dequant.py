"""MLX affine quantization, undone in NumPy.

MLX stores a quantized Linear or Embedding `X` as three tensors (mlx.core.quantize):

    X.weight  uint32[..., I * bits / 32]   the b-bit codes q, packed little-endian: code 0 of a
                                           row in the lowest bits of the first uint32
    X.scales  float[..., I / group_size]   one scale and one bias per group of `group_size`
    X.biases  float[..., I / group_size]   consecutive inputs (along the last axis)

and the float weight is w = scales * q + biases, group by group. (`X.bias`, singular, is the
ordinary Linear bias and stays a float tensor.) Which modules are quantized, with how many bits
and which group size, is written in config.json as mlx-lm and mlx-vlm write it:

    "quantization": {"group_size": 64, "bits": 4,
                     "<module path>": {"group_size": 64, "bits": 8}   # an override
                     "<module path>": false}                          # left in float
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from pg_edge.errors import CheckpointError
from pg_edge.checkpoint.folder import quantization_section


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32[..., P] packed b-bit codes -> uint32[..., P * 32 / bits], code 0 from the lowest bits."""
    packed = np.ascontiguousarray(packed, dtype=np.uint32)
    if 32 % bits == 0:  # 2, 4, 8 bits: each uint32 holds 32 / bits whole codes
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], -1)
    # 3, 5, 6 bits: codes straddle uint32 boundaries; read the row as one little-endian bit stream
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    n = stream.shape[-1] // bits
    code_bits = stream[..., : n * bits].reshape(*packed.shape[:-1], n, bits).astype(np.uint32)
    return (code_bits << np.arange(bits, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
               group_size: int, bits: int) -> np.ndarray:
    """MLX affine-quantized (weight, scales, biases) -> float32[..., I] with I = groups * group_size."""
    groups = scales.shape[-1]
    codes = unpack_codes(packed, bits)
    if codes.shape[-1] != groups * group_size or scales.shape != biases.shape:
        raise CheckpointError(
            f"quantized tensor of packed shape {packed.shape} with {groups} groups does not fit "
            f"bits={bits}, group_size={group_size} (scales {scales.shape}, biases {biases.shape})"
        )
    codes = codes.reshape(*scales.shape, group_size).astype(np.float32)
    scales = scales.astype(np.float32)[..., None]
    biases = biases.astype(np.float32)[..., None]
    return (scales * codes + biases).reshape(*packed.shape[:-1], groups * group_size)


def quantization_of(config: dict, module: str) -> tuple[int, int] | None:
    """(group_size, bits) of a module per config.json's "quantization" section, or None if float."""
    section = quantization_section(config)
    if not section:
        return None
    override = section.get(module, True)
    if override is False:
        return None
    settings = {**section, **override} if isinstance(override, dict) else section
    mode = settings.get("mode", "affine")
    if mode != "affine":
        raise CheckpointError(f"{module}: quantization mode {mode!r} is not supported (affine only)")
    try:
        return int(settings["group_size"]), int(settings["bits"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"config.json quantization for {module} lacks group_size/bits") from None


class DequantizedWeights(Mapping):
    """A view of a checkpoint's tensors in which every quantized `X.weight` reads as float32.

    `X.scales` and `X.biases` of quantized modules are hidden; everything else passes through.
    """

    def __init__(self, weights: Mapping[str, np.ndarray], config: dict):
        self.raw = weights
        self.config = config
        self.quantized = {name[: -len(".scales")] for name in weights
                          if name.endswith(".scales") and name[: -len(".scales")] + ".weight" in weights}

    def __getitem__(self, name: str) -> np.ndarray:
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and module in self.quantized:
            raise KeyError(name)
        if leaf != "weight" or module not in self.quantized:
            return self.raw[name]
        setting = quantization_of(self.config, module)
        if setting is None:
            raise CheckpointError(f"{module} has scales/biases but config.json says it is not quantized")
        group_size, bits = setting
        return dequantize(self.raw[name], self.raw[module + ".scales"], self.raw[module + ".biases"],
                          group_size, bits)

    def __iter__(self) -> Iterator[str]:
        hidden = {m + leaf for m in self.quantized for leaf in (".scales", ".biases")}
        return (name for name in self.raw if name not in hidden)

    def __len__(self) -> int:
        return len(self.raw) - 2 * len(self.quantized)
