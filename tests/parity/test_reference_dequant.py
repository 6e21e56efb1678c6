"""MLX affine quantization undone in NumPy (pg_edge.reference.dequant) against MLX itself, and
a quantized converted folder read by ReferenceModel.from_folder."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.errors import CheckpointError
from pg_edge.reference import ReferenceModel, dequantize, quantization_of
from pg_edge.reference.dequant import DequantizedWeights


def mlx_quantize(w: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, ...]:
    q, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    return np.array(q), np.array(scales), np.array(biases)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_matches_mlx(bits, group_size):
    w = np.random.default_rng(bits * group_size).normal(size=(2, 3, 256)).astype(np.float32)
    q, scales, biases = mlx_quantize(w, group_size, bits)
    want = np.array(mx.dequantize(mx.array(q), mx.array(scales), mx.array(biases),
                                  group_size=group_size, bits=bits))
    got = dequantize(q, scales, biases, group_size, bits)
    assert got.shape == w.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert np.abs(got - w).max() <= 1.01 * np.abs(scales).max()  # within one quantization step


def test_wrong_bits_for_the_shape_is_an_error():
    q, scales, biases = mlx_quantize(np.ones((4, 128), np.float32), 64, 4)
    with pytest.raises(CheckpointError, match="does not fit"):
        dequantize(q, scales, biases, 64, 8)


def test_quantization_section_defaults_overrides_and_false():
    config = {"quantization": {"group_size": 64, "bits": 4,
                               "a.o_proj": {"group_size": 32, "bits": 8}, "b.o_proj": False}}
    assert quantization_of(config, "c.o_proj") == (64, 4)
    assert quantization_of(config, "a.o_proj") == (32, 8)
    assert quantization_of(config, "b.o_proj") is None
    assert quantization_of({}, "c.o_proj") is None
    assert quantization_of({"quantization_config": {"group_size": 128, "bits": 2}}, "x") == (128, 2)
    with pytest.raises(CheckpointError, match="mxfp4"):
        quantization_of({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, "x")


def test_dequantized_view_hides_scales_and_biases():
    table = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    q, scales, biases = mlx_quantize(table, 32, 8)
    raw = {"emb.weight": q, "emb.scales": scales, "emb.biases": biases, "lin.bias": np.ones(3, np.float32)}
    view = DequantizedWeights(raw, {"quantization": {"group_size": 32, "bits": 8}})
    assert sorted(view) == ["emb.weight", "lin.bias"] and len(view) == 2
    assert view["emb.weight"].shape == (10, 64) and np.abs(view["emb.weight"] - table).max() < 0.05
    assert view["lin.bias"] is raw["lin.bias"]
    with pytest.raises(CheckpointError, match="not quantized"):
        DequantizedWeights(raw, {"quantization": {"group_size": 32, "bits": 8, "emb": False}})["emb.weight"]


def pad_columns(w: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([w, np.zeros((*w.shape[:-1], width - w.shape[-1]), w.dtype)], axis=-1)


def test_quantized_folder_matches_mlx_dequantized_weights(hf_checkpoint, tmp_path):
    """Decoder o_proj at 4 bits (one override at 8 bits / group 64, one left float) and SigLIP
    fc2 zero-padded 72 -> 96 inputs (layer 1 also fc1 rows + bias) at 4 bits: the folder's
    logits equal those of the float weights that mx.dequantize gives back."""
    from safetensors.numpy import save_file

    from fixtures.checkpoints import load_hf_model
    from test_reference import make_batch, reference_weights, sample_pixels

    folder = hf_checkpoint(version=2, image_size=28)
    config = json.loads((folder / "config.json").read_text())
    weights = reference_weights(load_hf_model(folder))
    lm, vt = "language_model.model.layers", "vision_tower.vision_model.encoder.layers"
    config_q = dict(config, quantization={"group_size": 32, "bits": 4, f"{lm}.1.self_attn.o_proj":
                                          {"group_size": 64, "bits": 8}, f"{lm}.2.self_attn.o_proj": False})
    fc1, fc1_bias = f"{vt}.1.mlp.fc1.weight", f"{vt}.1.mlp.fc1.bias"
    stored = dict(weights)
    stored[fc1] = np.concatenate([weights[fc1], np.zeros((24, weights[fc1].shape[1]), np.float32)])
    stored[fc1_bias] = pad_columns(weights[fc1_bias], 96)
    expected = dict(stored)  # what the reference should compute with: mx.dequantize's floats
    modules = {f"{lm}.0.self_attn.o_proj": (32, 4, None), f"{lm}.1.self_attn.o_proj": (64, 8, None),
               f"{vt}.0.mlp.fc2": (32, 4, 96), f"{vt}.1.mlp.fc2": (32, 4, 96)}
    for module, (group_size, bits, padded) in modules.items():
        w = weights[module + ".weight"]
        w = pad_columns(w, padded) if padded else w
        q, scales, biases = mlx_quantize(w, group_size, bits)
        stored.update({module + ".weight": q, module + ".scales": scales, module + ".biases": biases})
        expected[module + ".weight"] = np.array(mx.dequantize(mx.array(q), mx.array(scales), mx.array(biases),
                                                              group_size=group_size, bits=bits))
    save_file(stored, str(tmp_path / "model.safetensors"), metadata={"format": "mlx"})
    (tmp_path / "config.json").write_text(json.dumps(config_q))

    quantized = ReferenceModel.from_folder(tmp_path)
    assert quantized.params[f"{vt}.0.mlp.fc2.weight"].shape == (40, 96)
    ids, mask_ar, _ = make_batch(16, [4], [3], seed=8)
    pixels = sample_pixels(1, 28, seed=8)
    got = quantized.logits(ids, pixels, mask_ar)
    want = ReferenceModel(config, expected).logits(ids, pixels, mask_ar)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    unquantized = ReferenceModel(config, weights).logits(ids, pixels, mask_ar)
    assert np.abs(got - unquantized).max() > 1e-3  # the quantization really happened
    # Zero padding of the SigLIP MLP width is exact: padded float weights give the same logits.
    padded = dict(stored)
    padded.update({m + ".weight": pad_columns(weights[m + ".weight"], 96) for m in modules if "fc2" in m})
    padded.update({m + ".weight": weights[m + ".weight"] for m in modules if "o_proj" in m})
    padded = {k: v for k, v in padded.items() if not k.endswith((".scales", ".biases"))}
    same = ReferenceModel(config, padded).logits(ids, pixels, mask_ar)
    assert np.abs(same - unquantized).max() <= 1e-5 * np.abs(unquantized).max()
