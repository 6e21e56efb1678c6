"""A fake big_vision vae-oid.npz: random weights in the real key layout and PyTorch shapes.

Keys as big_vision reads them (pp/proj/paligemma/segmentation.py for the encoder,
evaluators/proj/paligemma/transfers/segmentation.py for the decoder); the encoder's kernel
sizes are not used by anything here and only need to be plausible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHANNELS = (128, 128, 64, 32, 16)  # decoder: after decoder.0, then after each transposed conv


def fake_vae_arrays(embed_dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """{key: float32 array} in torch layout: conv OIHW, conv-transpose (in, out, kH, kW)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def conv(name, c_out, c_in, k, transpose=False):
        # 1/sqrt(fan_in) keeps activations O(1) through 13 layers, so float32 differences
        # between implementations stay far below the test tolerance.
        shape = (c_in, c_out, k, k) if transpose else (c_out, c_in, k, k)
        fan_in = c_in * k * k / (4 if transpose else 1)  # stride 2: a quarter of taps hit
        arrays[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        arrays[f"{name}.bias"] = (0.1 * rng.standard_normal(c_out)).astype(np.float32)

    def resblock(name, dim):
        conv(f"{name}.net.0", dim, dim, 3)
        conv(f"{name}.net.2", dim, dim, 3)
        conv(f"{name}.net.4", dim, dim, 1)

    # Encoder: 64x64x1 mask -> 4 stride-2 convs -> 4x4x128 -> 2 resblocks -> 1x1 conv to E.
    c_in = 1
    for i, c_out in enumerate(reversed(CHANNELS[1:])):  # 16, 32, 64, 128
        conv(f"encoder.{2 * i}", c_out, c_in, 4)
        c_in = c_out
    resblock("encoder.8", 128)
    resblock("encoder.9", 128)
    conv("encoder.10", embed_dim, 128, 1)

    arrays["_vq_vae._embedding"] = rng.standard_normal((128, embed_dim)).astype(np.float32)

    conv("decoder.0", CHANNELS[0], embed_dim, 1)
    resblock("decoder.2", 128)
    resblock("decoder.3", 128)
    for i, (c_in, c_out) in enumerate(zip(CHANNELS[:-1], CHANNELS[1:])):
        conv(f"decoder.{4 + 2 * i}", c_out, c_in, 4, transpose=True)
    conv("decoder.12", 1, CHANNELS[-1], 1)
    return arrays


def write_fake_vae(path: str | Path, arrays: dict[str, np.ndarray] | None = None,
                   embed_dim: int = 8, seed: int = 0) -> Path:
    """Save `arrays` (default: fake_vae_arrays(embed_dim, seed)) as an .npz at `path`."""
    path = Path(path)
    np.savez(path, **(arrays if arrays is not None else fake_vae_arrays(embed_dim, seed)))
    return path
