"""The NumPy reference (pg_edge.reference) against transformers' PaliGemma, float32, eager.

Logits are compared at EVERY position, with a prefix-LM mask (prefix + causal suffix): on the
transformers side token_type_ids = mask_ar (0 prefix, 1 suffix) and attention_mask = valid,
which gives the same mask (see pg_edge/reference/masks.py). Tolerance: max |diff| <= 1e-4 x
max |logit| over the valid positions.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.checkpoints import load_hf_model
from pg_edge.reference import ReferenceModel
from pg_edge.reference.safetensors_np import load_file

TOL = 1e-4
IMAGE, BOS, EOS, NEWLINE = 257152, 2, 1, 108
ROOT = Path(__file__).resolve().parents[2]


def reference_weights(hf_model) -> dict[str, np.ndarray]:
    """transformers 5 in-memory names -> the hub's classic names, patch conv OIHW -> OHWI."""
    out = {}
    for name, tensor in hf_model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower."):]
            name = "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
        elif name.startswith("model.multi_modal_projector."):
            name = name[len("model."):]
        elif name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model."):]
        elif name == "lm_head.weight":
            if hf_model.config.tie_word_embeddings:
                continue
            name = "language_model.lm_head.weight"
        if name.endswith("patch_embedding.weight"):
            array = array.transpose(0, 2, 3, 1)
        out[name] = np.ascontiguousarray(array)
    return out


_MODELS: dict = {}


@pytest.fixture
def models(hf_checkpoint):
    """(hf_model, ReferenceModel, config dict) for a fixture checkpoint, cached per spec."""
    def get(**spec):
        key = tuple(sorted(spec.items()))
        if key not in _MODELS:
            folder = hf_checkpoint(**spec)
            hf = load_hf_model(folder)
            config = json.loads((folder / "config.json").read_text())
            _MODELS[key] = hf, ReferenceModel(config, reference_weights(hf)), config
        return _MODELS[key]
    return get


def make_batch(n_image: int, prefix_lens: list[int], suffix_lens: list[int], pad: str = "right",
               seed: int = 0):
    """ids int[B, T], mask_ar int[B, T], valid bool[B, T]: image tokens, <bos>, prefix, "\\n",
    suffix (random text ids), padded to a common length on the `pad` side."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, s in zip(prefix_lens, suffix_lens):
        ids = [IMAGE] * n_image + [BOS] + rng.integers(365, 256000, p).tolist() + [NEWLINE] \
            + rng.integers(365, 256000, s).tolist()
        rows.append((ids, [0] * (len(ids) - s) + [1] * s))
    t = max(len(ids) for ids, _ in rows)
    ids, mask_ar, valid = (np.zeros((len(rows), t), dt) for dt in (np.int64, np.int64, bool))
    for b, (row, ar) in enumerate(rows):
        cols = slice(0, len(row)) if pad == "right" else slice(t - len(row), t)
        ids[b, cols], mask_ar[b, cols], valid[b, cols] = row, ar, True
    return ids, mask_ar, valid


def sample_pixels(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """float32[B, S, S, 3] in [-1, 1], smooth enough to look like an image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(5 * xx + yy), np.cos(3 * yy - xx), xx * yy * 2 - 1], axis=-1)
    return np.clip(base + rng.normal(0, 0.3, (batch, size, size, 3)), -1, 1).astype(np.float32)


@torch.no_grad()
def hf_logits(hf, ids, pixels, mask_ar, valid) -> np.ndarray:
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()),
              token_type_ids=torch.tensor(mask_ar), attention_mask=torch.tensor(valid.astype(np.int64)),
              use_cache=False).logits.numpy()


def rel_diff(got, want, valid) -> float:
    return float(np.abs(got - want)[valid].max() / np.abs(want[valid]).max())


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("image_size", [28, 56])
def test_logits_match_transformers_at_every_position(version, image_size, models):
    hf, ref, _ = models(version=version, image_size=image_size)
    n = (image_size // 7) ** 2
    ids, mask_ar, valid = make_batch(n, [5], [6])
    pixels = sample_pixels(1, image_size)
    want = hf_logits(hf, ids, pixels, mask_ar, valid)
    got = ref.logits(ids, pixels, mask_ar, valid)
    assert got.shape == want.shape and got.dtype == np.float32
    worst = rel_diff(got, want, valid)
    print(f"PG{version} {n} image tokens: max |diff| / max |logit| = {worst:.1e}")
    assert worst <= TOL


def test_image_features_match_transformers(models):
    hf, ref, _ = models(version=2, image_size=56)
    pixels = sample_pixels(2, 56, seed=3)
    with torch.no_grad():
        nchw = torch.tensor(pixels.transpose(0, 3, 1, 2).copy())
        want = hf.model.get_image_features(nchw).pooler_output.numpy()
    got = ref.image_features(pixels)
    assert got.shape == (2, 64, 48)
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


def test_sliding_window_matches_transformers(models):
    """PG2, window 8 much shorter than the prompt: the suffix only sees the last 8 positions in
    the sliding layers, while the prefix stays fully bidirectional (transformers' semantics)."""
    hf, ref, _ = models(version=2, image_size=28, sliding_window=8)
    _, ref_global, _ = models(version=2, image_size=28)  # same weights, window 4096
    ids, mask_ar, valid = make_batch(16, [6], [7])
    pixels = sample_pixels(1, 28, seed=1)
    want = hf_logits(hf, ids, pixels, mask_ar, valid)
    got = ref.logits(ids, pixels, mask_ar, valid)
    worst = rel_diff(got, want, valid)
    print(f"PG2 window 8: max |diff| / max |logit| = {worst:.1e}")
    assert worst <= TOL
    # The window is really active: only suffix positions change, and they change a lot.
    unwindowed = ref_global.logits(ids, pixels, mask_ar, valid)
    changed = np.abs(got - unwindowed).max(axis=-1)[0] > 1e-3
    assert not changed[mask_ar[0] == 0].any() and changed[mask_ar[0] == 1].all()


def untied(hf, seed: int = 0):
    """A copy of `hf` with an lm_head of its own (random rows; the padded rows 257152.. zero).

    With the fixtures' tied embeddings a random model repeats the token it was fed forever,
    which would make a 20-token comparison (and the sliding window) prove little."""
    model = copy.deepcopy(hf)
    rows, width = model.lm_head.weight.shape
    weight = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) / width ** 0.5
    weight[IMAGE:] = 0
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.config.tie_word_embeddings = False
    return model


@torch.no_grad()
def hf_generate(hf, ids, pixels, n: int) -> list[int]:
    ids_t = torch.tensor(ids)
    out = hf.generate(input_ids=ids_t, pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()),
                      token_type_ids=torch.zeros_like(ids_t), attention_mask=torch.ones_like(ids_t),
                      max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("version,window", [(1, None), (2, None), (2, 8)])
def test_greedy_matches_transformers_generate(version, window, models):
    spec = dict(version=version, image_size=28) | ({"sliding_window": window} if window else {})
    hf, _, config = models(**spec)
    hf = untied(hf)
    ref = ReferenceModel(config, reference_weights(hf))
    assert "language_model.lm_head.weight" in ref.params
    ids, _, _ = make_batch(16, [7], [0], seed=5)
    pixels = sample_pixels(1, 28, seed=5)
    want = hf_generate(hf, ids, pixels, 20)
    got = ref.greedy(ids[0], pixels, max_tokens=20, eos_id=EOS)
    print(f"PG{version} window {window}: {got}")
    assert got == want
    assert len(got) >= 10 and len(set(got)) >= 5
    if window:  # the window changed what was generated (prompt 25 tokens, window 8)
        hf_global, _, _ = models(version=version, image_size=28)
        assert hf_generate(untied(hf_global), ids, pixels, 20) != want


def test_stale_top_level_hidden_size_is_ignored(models):
    hf, ref, config = models(version=2, image_size=28, top_hidden_mismatch=True)
    assert config["hidden_size"] != config["text_config"]["hidden_size"]
    ids, mask_ar, valid = make_batch(16, [4], [3], seed=2)
    pixels = sample_pixels(1, 28, seed=2)
    want = hf_logits(hf, ids, pixels, mask_ar, valid)
    assert rel_diff(ref.logits(ids, pixels, mask_ar, valid), want, valid) <= TOL


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("version,window", [(1, None), (2, 8)])
def test_batch_of_two_with_padding(version, window, pad, models):
    spec = dict(version=version, image_size=28) | ({"sliding_window": window} if window else {})
    hf, ref, _ = models(**spec)
    ids, mask_ar, valid = make_batch(16, [6, 2], [5, 3], pad=pad, seed=4)
    assert not valid.all()
    pixels = sample_pixels(2, 28, seed=4)
    got = ref.logits(ids, pixels, mask_ar, valid)
    assert rel_diff(got, hf_logits(hf, ids, pixels, mask_ar, valid), valid) <= TOL
    # Each row equals that row run alone, unpadded.
    for b in range(2):
        alone = ref.logits(ids[b:b + 1, valid[b]], pixels[b:b + 1], mask_ar[b:b + 1, valid[b]])
        assert np.abs(got[b, valid[b]] - alone[0]).max() <= 1e-5 * np.abs(alone).max()


def test_float64_agrees_and_whole_prompt_is_prefix_by_default(models):
    hf, ref, config = models(version=2, image_size=28)
    ref64 = ReferenceModel(config, ref.params.tensors.raw, dtype=np.float64)
    ids, _, _ = make_batch(16, [5], [0], seed=6)
    pixels = sample_pixels(1, 28, seed=6)
    zeros, ones = np.zeros_like(ids), np.ones(ids.shape, bool)
    want = hf_logits(hf, ids, pixels, zeros, ones)
    got = ref64.logits(ids, pixels)
    assert got.dtype == np.float64
    assert rel_diff(got, want, ones) <= TOL


def test_reference_imports_no_mlx_torch_or_transformers(models, tmp_path):
    """Import + a forward pass from a converted folder, in a fresh interpreter."""
    from safetensors.numpy import save_file

    _, ref, config = models(version=1, image_size=28)
    weights = {k: np.asarray(v) for k, v in ref.params.tensors.raw.items()}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "mlx"})  # MLX layout
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = (
        "import sys, numpy as np\n"
        "from pg_edge.reference import ReferenceModel\n"
        f"ref = ReferenceModel.from_folder({str(tmp_path)!r})\n"
        "ids = np.array([[257152] * 16 + [2, 400, 500, 108]])\n"
        "print(ref.logits(ids, np.zeros((1, 28, 28, 3), np.float32)).shape)\n"
        "print(sorted(m for m in ('mlx', 'torch', 'transformers') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["(1, 20, 257216)", "[]"]


def test_from_folder_reads_bf16_shards_like_memory(models, tmp_path):
    """A sharded folder (index json) with bf16 tensors gives the logits of the same weights
    rounded to bf16 in memory; the reader agrees with the safetensors library."""
    from safetensors.torch import save_file

    _, ref, config = models(version=2, image_size=28)
    weights = ref.params.tensors.raw
    bf16 = {k: torch.tensor(np.asarray(v)).to(torch.bfloat16) for k, v in weights.items()}
    names = sorted(bf16)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: bf16[k] for k in keys}, str(tmp_path / file), metadata={"format": "mlx"})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, so never read")

    first = load_file(tmp_path / "model-00001-of-00002.safetensors")
    for k, v in first.items():
        assert v.dtype == np.float32 and np.array_equal(v, bf16[k].float().numpy()), k

    from_disk = ReferenceModel.from_folder(tmp_path)
    in_memory = ReferenceModel(config, {k: v.float().numpy() for k, v in bf16.items()})
    ids, mask_ar, valid = make_batch(16, [3], [2], seed=7)
    pixels = sample_pixels(1, 28, seed=7)
    assert np.array_equal(from_disk.logits(ids, pixels, mask_ar), in_memory.logits(ids, pixels, mask_ar))


def test_bad_files_and_inputs_give_clear_errors(models, tmp_path):
    from safetensors.numpy import save_file

    from pg_edge.errors import CheckpointError
    from pg_edge.reference.safetensors_np import read_folder

    path = tmp_path / "model.safetensors"
    save_file({"a": np.arange(1000, dtype=np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_file(path)
    path.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        load_file(path)
    path.write_bytes(len(b"{nope").to_bytes(8, "little") + b"{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_file(path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        read_folder(tmp_path)

    _, ref, config = models(version=1, image_size=28)
    hf_layout = dict(ref.params.tensors.raw)
    conv = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    hf_layout[conv] = hf_layout[conv].transpose(0, 3, 1, 2)  # back to OIHW
    with pytest.raises(ValueError, match="MLX layout"):
        ReferenceModel(config, hf_layout)
    ids = np.array([[IMAGE] * 16 + [BOS, 400, NEWLINE]])
    with pytest.raises(ValueError, match="NHWC"):
        ref.logits(ids, np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="16 <image> tokens"):
        ref.logits(ids[:, 2:], np.zeros((1, 28, 28, 3), np.float32))
