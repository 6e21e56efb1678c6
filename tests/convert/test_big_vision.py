"""big_vision .npz -> converted folder: same tensors and logits as converting the HF folder.

The .npz files are written by fixtures/big_vision.py, whose inverse mapping is written by hand,
independently of convert/big_vision.py, from the same random weights as the HF fixtures.
"""
import json
import shutil
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from pg_edge.cli import main
from pg_edge.convert.big_vision import convert_big_vision, hf_config
from pg_edge.convert.npz import ChainedFile, NpzArchive
from pg_edge.errors import CheckpointError
from pg_edge.pipeline import load
from fixtures.big_vision import bv_arrays, bf16_void_to_f32, to_bf16_void, write_bv_checkpoint, write_npz
from fixtures.vae import write_fake_vae

# The tiny PG2 fixture's Gemma2 settings (big_vision files carry no config: the converter
# writes the real models' 50 / 30 / head_dim, checked in test_config_*).
TINY_PG2 = dict(query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=15.0)
PROMPTS = ["caption en", "answer en what is on the table?", "detect cat ; dog"]
REAL_VOCAB = 257152


def overrides(version):
    return TINY_PG2 if version == 2 else None


@pytest.fixture
def hf_ref(converted):
    """(version, dtype) -> the HF fixture converted by convert_hf (the reference folder)."""
    return lambda version, dtype="float32": converted(version=version, dtype=dtype)


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_same_tensors(got_dir, ref_dir):
    got, ref = tensors(got_dir), tensors(ref_dir)
    assert sorted(got) == sorted(ref)
    for k in ref:
        a, b = got[k], ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if k.endswith("embed_tokens.weight"):  # HF's padding rows differ (never emitted)
            a, b = a[:REAL_VOCAB], b[:REAL_VOCAB]
        assert mx.array_equal(a, b).item(), k


def max_logit_diff(a_dir, b_dir, images):
    pa, pb = load(a_dir, dtype=mx.float32), load(b_dir, dtype=mx.float32)
    worst, scale = 0.0, 0.0
    for image, prompt in zip(images, PROMPTS):
        a, b = pa.logits(image, prompt)[:REAL_VOCAB], pb.logits(image, prompt)[:REAL_VOCAB]
        worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(b).max()))
    return worst, scale


@pytest.mark.parametrize("version", [1, 2])
def test_f32_npz_equals_hf_conversion(version, hf_checkpoint, hf_ref, sample_images, tmp_path):
    write_bv_checkpoint(hf_checkpoint(version=version), tmp_path / "pt_28.npz")
    out = convert_big_vision(tmp_path / "pt_28.npz", tmp_path / "out", dtype="float32",
                             text_overrides=overrides(version), quiet=True)
    assert_same_tensors(out, hf_ref(version))
    worst, scale = max_logit_diff(out, hf_ref(version), sample_images)
    print(f"PG{version} f32 npz vs HF: max |logit diff| = {worst:.2e} (max |logit| {scale:.1f})")
    assert worst <= 1e-6 * scale


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_void_npz_equals_hf_bf16_conversion(version, hf_checkpoint, hf_ref, sample_images, tmp_path):
    npz = tmp_path / "pt_28.bf16.npz"
    write_bv_checkpoint(hf_checkpoint(version=version), npz, dtype="bfloat16")
    with zipfile.ZipFile(npz) as z, z.open("params/llm/layers/mlp/linear.npy") as f:
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[2] == np.dtype("V2")  # really stored as void
    out = convert_big_vision(npz, tmp_path / "out", dtype="bfloat16", text_overrides=overrides(version), quiet=True)
    assert_same_tensors(out, hf_ref(version, "bfloat16"))  # RNE rounding on both sides: exact
    worst, _ = max_logit_diff(out, hf_ref(version, "bfloat16"), sample_images)
    vs_f32, scale = max_logit_diff(out, hf_ref(version), sample_images)
    print(f"PG{version} bf16 npz: vs HF bf16 {worst:.2e}, vs HF f32 {vs_f32:.2e} (max |logit| {scale:.1f})")
    assert worst <= 1e-6 * scale and vs_f32 <= 0.05 * scale


def test_f16_npz_within_f16_rounding(hf_checkpoint, hf_ref, sample_images, tmp_path):
    write_bv_checkpoint(hf_checkpoint(version=1), tmp_path / "pt.f16.npz", dtype="float16")
    out = convert_big_vision(tmp_path / "pt.f16.npz", tmp_path / "out", dtype="float32", quiet=True)
    got, ref = tensors(out), tensors(hf_ref(1))
    for k in ref:
        n = REAL_VOCAB if k.endswith("embed_tokens.weight") else None
        want = np.array(ref[k][:n]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.array(got[k][:n]), want, err_msg=k)
    worst, scale = max_logit_diff(out, hf_ref(1), sample_images)
    assert worst <= 0.01 * scale


def test_split_parts_unprefixed_and_transposed_gating(hf_checkpoint, hf_ref, tmp_path):
    """28B-style .npz.part* pieces (given as first part, a middle part or the bare .npz name),
    keys without `params/`, gating_einsum stored (2, F, D): all the same weights."""
    parts = write_bv_checkpoint(hf_checkpoint(version=2), tmp_path / "m.npz", dtype="bfloat16",
                                parts=3, prefix=False, gating_fd=True)
    assert not (tmp_path / "m.npz").exists() and len(parts) == 3
    outs = []
    for i, src in enumerate([parts[0], parts[1], tmp_path / "m.npz"]):
        # max_shard_bytes=1: one decoder layer per shard, so the layer grouping is exercised too
        outs.append(convert_big_vision(src, tmp_path / f"out{i}", text_overrides=TINY_PG2, quiet=True,
                                       max_shard_bytes=1 if i == 0 else 2 << 30))
    assert len(list(outs[0].glob("model-*.safetensors"))) == 2 + 3  # vision, embeddings, 3 layers
    for out in outs:
        assert_same_tensors(out, hf_ref(2, "bfloat16"))
    # The pieces are read in place: no joined copy appears beside them.
    assert sorted(p.name for p in tmp_path.glob("m.npz*")) == ["m.npz.part0", "m.npz.part1", "m.npz.part2"]


def test_cli_converts_npz_and_writes_hf_side_files(hf_checkpoint, hf_ref, sample_images, tmp_path):
    write_bv_checkpoint(hf_checkpoint(version=1), tmp_path / "pt_28.npz", tokenizer=False)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(hf_checkpoint(version=1) / "tokenizer.model", tok_dir / "paligemma_tokenizer.model")
    out = tmp_path / "out"
    code = main(["convert", str(tmp_path / "pt_28.npz"), "-o", str(out), "--dtype", "float32", "--quiet",
                 "--tokenizer", str(tok_dir / "paligemma_tokenizer.model")])
    assert code == 0
    assert json.loads((out / "added_tokens.json").read_text()) == {"<image>": 257152}
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 28, "width": 28} and pre["image_seq_length"] == 16
    assert (out / "tokenizer.model").read_bytes() == (hf_checkpoint(version=1) / "tokenizer.model").read_bytes()
    worst, scale = max_logit_diff(out, hf_ref(1), sample_images[:1])
    assert worst <= 1e-6 * scale


def test_transformers_reads_the_config_and_tokenizer_files(hf_checkpoint, tmp_path):
    from transformers import AutoProcessor, PaliGemmaConfig

    write_bv_checkpoint(hf_checkpoint(version=2), tmp_path / "pt.npz")
    out = convert_big_vision(tmp_path / "pt.npz", tmp_path / "out", quiet=True)
    cfg = PaliGemmaConfig.from_pretrained(out)
    assert cfg.text_config.model_type == "gemma2" and cfg.text_config.vocab_size == 257216
    proc = AutoProcessor.from_pretrained(out)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == 257152
    assert proc.tokenizer("<loc0123>", add_special_tokens=False).input_ids == [256123]
    pg = load(out)
    ids = proc(text="<image>caption en", images=sample_image(), return_tensors="np")["input_ids"][0]
    assert ids.tolist() == pg.prepare([sample_image()], ["caption en"]).input_ids[0].tolist()


def test_converted_pg2_loads_in_mlx_vlm(hf_checkpoint, sample_images, tmp_path):
    """The folder is the ecosystem's layout: mlx-vlm's loader runs it with the same logits.
    (PG2 only: mlx-vlm's Gemma 1 path assumes head_dim = D / heads, which the real PG1 has but
    the non-square fixture has not.)"""
    from mlx_vlm.utils import load_model

    write_bv_checkpoint(hf_checkpoint(version=2), tmp_path / "pt.npz")
    out = convert_big_vision(tmp_path / "pt.npz", tmp_path / "out", dtype="float32",
                             text_overrides=TINY_PG2, quiet=True)
    theirs, ours = load_model(out), load(out)
    inp = ours.prepare([sample_images[0]], ["caption en"])
    logits = theirs(mx.array(inp.input_ids), mx.array(inp.pixel_values.transpose(0, 3, 1, 2)),
                    mask=mx.ones(inp.input_ids.shape)).logits
    got, want = np.array(logits[0, -1]), ours.logits(sample_images[0], "caption en")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def sample_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))


def test_config_from_shapes():
    pg1 = dict(P=14, C=3, W=1152, NP=256, Lv=27, Hv=16, hv=72, Fv=4304, V=257152, V_hf=257216,
               D=2048, L=18, N=8, K=1, H=256, F=16384)
    c = hf_config(1, pg1, "bfloat16")
    assert c["text_config"]["model_type"] == "gemma" and "attn_logit_softcapping" not in c["text_config"]
    assert c["vision_config"]["image_size"] == 224 and c["vocab_size"] == 257216
    pg2_3b = {**pg1, "D": 2304, "L": 26, "N": 8, "K": 4, "F": 9216, "NP": 1024}
    t = hf_config(2, pg2_3b, "bfloat16")["text_config"]
    assert (t["attn_logit_softcapping"], t["final_logit_softcapping"], t["query_pre_attn_scalar"]) == (50.0, 30.0, 256)
    assert hf_config(2, pg2_3b, "bfloat16")["vision_config"]["image_size"] == 448
    pg2_28b = {**pg1, "D": 4608, "L": 46, "N": 32, "K": 16, "H": 128, "F": 36864}
    assert hf_config(2, pg2_28b, "bfloat16")["text_config"]["query_pre_attn_scalar"] == 144


# --- bad input: a clear error naming the key, non-zero exit, nothing left behind -------------

@pytest.fixture
def pg1_arrays(hf_checkpoint, tmp_path):
    """The PG1 fixture's big_vision arrays, with tokenizer.model already beside bad.npz."""
    shutil.copy(hf_checkpoint(version=1) / "tokenizer.model", tmp_path / "tokenizer.model")
    return bv_arrays(hf_checkpoint(version=1))


def _bad(tmp_path, arrays, capsys, expect, **kw):
    npz = tmp_path / "bad.npz"
    write_npz(arrays, npz, **kw)
    out = tmp_path / "out"
    assert main(["convert", str(npz), "-o", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no partial folder either


def test_wrong_model_is_refused(tmp_path, capsys, pg1_arrays):
    write_fake_vae(tmp_path / "vae-oid.npz")  # a real-looking .npz of another network
    assert main(["convert", str(tmp_path / "vae-oid.npz"), "-o", str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "not a big_vision PaliGemma checkpoint" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["llm/layers/mlp/linear", "img/Transformer/encoder_norm/bias",
                                 "llm/layers/pre_ffw_norm/scale"])
def test_missing_key_is_named(key, tmp_path, capsys, pg1_arrays):
    del pg1_arrays[key]
    _bad(tmp_path, pg1_arrays, capsys, f"missing key params/{key}")


def test_shape_mismatch_is_named(tmp_path, capsys, pg1_arrays):
    pg1_arrays["img/head/bias"] = np.zeros(49, np.float32)
    _bad(tmp_path, pg1_arrays, capsys, "params/img/head/bias has shape (49,), expected (48,) = (D)")
    pg1_arrays["img/head/bias"] = np.zeros(48, np.float32)
    pg1_arrays["llm/layers/attn/kv_einsum/w"] = pg1_arrays["llm/layers/attn/kv_einsum/w"][..., :8]
    _bad(tmp_path, pg1_arrays, capsys, "params/llm/layers/attn/kv_einsum/w has shape (2, 2, 1, 48, 8)")


@pytest.mark.parametrize("key", ["llm/layers/post_ffw_norm/scale", "opt/state/mu"])
def test_unknown_key_is_named(key, tmp_path, capsys, pg1_arrays):
    pg1_arrays[key] = np.zeros((2, 48), np.float32)
    _bad(tmp_path, pg1_arrays, capsys, f"unknown key params/{key}")


def test_integer_weights_are_refused(tmp_path, capsys, pg1_arrays):
    np.savez(tmp_path / "int.npz", **{f"params/{k}": v.astype(np.int32 if "final_norm" in k else np.float32)
                                       for k, v in pg1_arrays.items()})
    assert main(["convert", str(tmp_path / "int.npz"), "-o", str(tmp_path / "out"), "--quiet"]) != 0
    assert "params/llm/final_norm/scale has dtype int32" in capsys.readouterr().err


def test_missing_part_tokenizer_and_existing_output(hf_checkpoint, tmp_path, capsys):
    parts = write_bv_checkpoint(hf_checkpoint(version=1), tmp_path / "m.npz", parts=3)
    parts[-1].unlink()
    assert main(["convert", str(parts[0]), "-o", str(tmp_path / "o"), "--quiet"]) != 0
    assert "are all .part files present?" in capsys.readouterr().err
    (tmp_path / "sub").mkdir()
    write_bv_checkpoint(hf_checkpoint(version=1), tmp_path / "sub" / "m.npz", tokenizer=False)
    assert main(["convert", str(tmp_path / "sub" / "m.npz"), "-o", str(tmp_path / "o"), "--quiet"]) != 0
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    assert main(["convert", str(tmp_path / "sub" / "m.npz"), "-o", str(tmp_path / "o"), "--quiet",
                 "--tokenizer", str(hf_checkpoint(version=1))]) != 0
    assert "exists" in capsys.readouterr().err


def test_convert_vae_command(tmp_path, capsys):
    from pg_edge.model.vae import load_mask_decoder

    src = write_fake_vae(tmp_path / "vae-oid.npz")
    assert main(["convert-vae", str(src), "-o", str(tmp_path / "vae.safetensors")]) == 0
    assert load_mask_decoder(tmp_path / "vae.safetensors").embed_dim == 8
    assert main(["convert-vae", str(src), "-o", str(tmp_path / "vae.safetensors")]) != 0
    assert "exists" in capsys.readouterr().err


# --- the lazy reader ---------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader_slices_every_dtype(tmp_path, compressed):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3, 7)).astype(np.float32)
    arrays = {"params/x32": a, "params/x16": a.astype(np.float16), "params/xbf": to_bf16_void(a)}
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", **arrays)
    with NpzArchive(tmp_path / "a.npz") as npz:
        assert npz.shape("params/xbf") == (5, 3, 7) and npz.dtype("params/xbf") == np.dtype("V2")
        for i in [0, 3, 4, 1]:  # out of order too: a compressed member restarts its stream
            np.testing.assert_array_equal(npz.read("params/x32", i), a[i])
            np.testing.assert_array_equal(npz.read("params/x16", i), a[i].astype(np.float16))
            bf = npz.read("params/xbf", i)
            assert bf.dtype == mx.bfloat16
            np.testing.assert_array_equal(np.array(bf.astype(mx.float32)), bf16_void_to_f32(arrays["params/xbf"][i]))
        np.testing.assert_array_equal(npz.read("params/x32"), a)


def test_chained_file_reads_across_boundaries(tmp_path):
    data = bytes(range(256)) * 3
    paths = []
    for n, (a, b) in enumerate([(0, 100), (100, 101), (101, 500), (500, 768)]):
        paths.append(tmp_path / f"p{n}")
        paths[-1].write_bytes(data[a:b])
    f = ChainedFile(paths)
    f.seek(95)
    assert f.read(10) == data[95:105]
    f.seek(-5, 2)
    assert f.read(100) == data[-5:]
    f.seek(0)
    assert f.read() == data
    f.close()


def test_reader_errors_are_checkpoint_errors(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="cannot read junk.npz"):
        NpzArchive(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        NpzArchive(tmp_path / "missing.npz")


def test_reading_a_layer_reads_only_that_layer(tmp_path, monkeypatch):
    """A stored member's slice is a seek + read of its own bytes, not of the stacked array."""
    a = np.arange(8 * 512 * 1024, dtype=np.float32).reshape(8, 512, 1024)  # 16 MB, 2 MB a layer
    np.savez(tmp_path / "big.npz", **{"params/llm/x": a})
    counted = []
    real = ChainedFile.readinto
    monkeypatch.setattr(ChainedFile, "readinto", lambda self, buf: counted.append(real(self, buf)) or counted[-1])
    with NpzArchive(tmp_path / "big.npz") as npz:
        counted.clear()
        np.testing.assert_array_equal(npz.read("params/llm/x", 5), a[5])
    assert sum(counted) < a[5].nbytes + (1 << 20) + 4096  # the layer, plus at most one buffer fill


def test_part_files_are_ordered_by_number(tmp_path):
    from pg_edge.convert.npz import source_files

    for n in (10, 2, 1, 0):
        (tmp_path / f"m.npz.part{n}").write_bytes(b"")
    (tmp_path / "m.npz.partial").write_bytes(b"")  # an unfinished download, not a piece
    assert [p.name for p in source_files(tmp_path / "m.npz.part2")] == [
        "m.npz.part0", "m.npz.part1", "m.npz.part2", "m.npz.part10"]
    for s in ("ab", "aa"):
        (tmp_path / f"s.npz.part{s}").write_bytes(b"")
    assert [p.name for p in source_files(tmp_path / "s.npz")] == ["s.npz.partaa", "s.npz.partab"]


def test_unprefixed_file_errors_name_keys_as_in_the_file(tmp_path, capsys, pg1_arrays):
    del pg1_arrays["llm/final_norm/scale"]
    _bad(tmp_path, pg1_arrays, capsys, "missing key llm/final_norm/scale (PaliGemma 1", prefix=False)
