"""Many LoRA adapters on one loaded base: each row of a batch picks its own.

`MultiLoRALinear` wraps a base linear layer (float or quantized, the backend's class kept) and
holds every loaded adapter's low-rank factors stacked, slot 0 being "no adapter" (zeros):

    A: float[K + 1, in, r]    B: float[K + 1, r, out]    scale: float[K + 1]

The base product is computed once for the whole batch; each row then adds its own delta,

    y[b] = base(x)[b] + scale[i_b] * (x[b] @ A[i_b]) @ B[i_b]       i_b = the row's slot

(mlx-lm's LoRALinear arithmetic, with A and B gathered per row). The base weights are never
changed, so every adapter and the base alone run on the same weights at once. Ranks may
differ: a smaller rank is zero-padded to the largest (exact: the padded columns add zeros).

Which slot each row uses travels in one `Routing` shared by every wrapped layer: the caller
sets `routing.rows` (int32[B], or None when every row is the base alone: the delta is then
skipped) before a model call. The model's calls all run on one thread (pg_edge.worker).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class Routing:
    """The slot of each batch row for the next model call: int32[B], or None (all base)."""

    def __init__(self):
        self.rows: mx.array | None = None

    def set(self, slots: list[int]) -> None:
        self.rows = mx.array(slots, dtype=mx.int32) if any(slots) else None


def dims(linear: nn.Module) -> tuple[int, int]:
    """(in, out) of a float or quantized linear layer."""
    out, inp = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        inp = inp * 32 // linear.bits
    return int(inp), int(out)


class MultiLoRALinear(nn.Module):
    def __init__(self, linear: nn.Module, routing: Routing):
        super().__init__()
        self.linear = linear
        self.in_dims, self.out_dims = dims(linear)
        object.__setattr__(self, "_routing", routing)  # shared, not a child module
        # Slot 0 = no adapter; stacks are (re)built by set_factors.
        self.lora_A = mx.zeros((1, self.in_dims, 1), dtype=mx.float32)
        self.lora_B = mx.zeros((1, 1, self.out_dims), dtype=mx.float32)
        self.lora_scale = mx.zeros((1,), dtype=mx.float32)

    def set_factors(self, factors: list[tuple[mx.array, mx.array, float] | None]) -> None:
        """Rebuild the stacks: factors[k] = (A float[in, r], B float[r, out], scale) for slot
        k + 1, or None for a slot left empty (an adapter without a delta on this layer)."""
        rank = max([1] + [a.shape[1] for f in factors if f is not None for a in f[:1]])
        dtype = next((f[0].dtype for f in factors if f is not None), mx.float32)
        As = [mx.zeros((self.in_dims, rank), dtype=dtype)]
        Bs = [mx.zeros((rank, self.out_dims), dtype=dtype)]
        scales = [0.0]
        for f in factors:
            if f is None:
                As.append(As[0]), Bs.append(Bs[0]), scales.append(0.0)
                continue
            a, b, s = f
            pad = rank - a.shape[1]
            As.append(mx.pad(a.astype(dtype), [(0, 0), (0, pad)]) if pad else a.astype(dtype))
            Bs.append(mx.pad(b.astype(dtype), [(0, pad), (0, 0)]) if pad else b.astype(dtype))
            scales.append(float(s))
        self.lora_A, self.lora_B = mx.stack(As), mx.stack(Bs)
        self.lora_scale = mx.array(scales, dtype=mx.float32)
        mx.eval(self.lora_A, self.lora_B, self.lora_scale)

    def __call__(self, x: mx.array) -> mx.array:
        """x: float[B, ..., in] -> float[B, ..., out]."""
        y = self.linear(x)
        rows = self._routing.rows
        if rows is None:
            return y
        B = x.shape[0]
        shape = x.shape
        x3 = x.reshape(B, -1, shape[-1])  # [B, T, in]
        a = self.lora_A[rows]  # [B, in, r]
        b = self.lora_B[rows]  # [B, r, out]
        z = (x3 @ a) @ b  # [B, T, out]
        s = self.lora_scale[rows].reshape(B, 1, 1)
        return y + (s * z).astype(x.dtype).reshape(*shape[:-1], self.out_dims)


def wrap(model: nn.Module, paths: list[str], routing: Routing) -> dict[str, MultiLoRALinear]:
    """Wrap the layers at `paths` (those not wrapped yet); returns every wrapped layer by path."""
    modules = dict(model.named_modules())
    swaps = [(p, MultiLoRALinear(modules[p], routing)) for p in paths
             if not isinstance(modules[p], MultiLoRALinear)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return {p: m for p, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


__all__ = ["Routing", "MultiLoRALinear", "wrap", "dims"]
