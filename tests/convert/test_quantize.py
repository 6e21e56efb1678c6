"""4/8-bit quantization: recipes, SigLIP padding, round trips, quality ordering, mlx-vlm interop,
bad input. Runs on fixtures/quantizable.py (widths 64, SigLIP MLP 72 like the real 4304) and on
the shared narrow fixture (widths 40/48), converted to float32 folders."""
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from fixtures.quantizable import make_quantizable_checkpoint

from pg_edge.cli import main
from pg_edge.model.config import PaliGemmaConfig
from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.checkpoint.folder import read_config
from pg_edge.checkpoint.loader import build_model, load_model, load_weights
from pg_edge.eval.metrics import compare_logits
from pg_edge.pipeline import load
from pg_edge.checkpoint.weights import component
from pg_edge.quantize import DEFAULT_RECIPE, RECIPES, padded_width, quantize, quantize_weights
from pg_edge.quantize.plan import pad_vision_mlp
from pg_edge.eval.probes import shapes_image, stripes_image
from pg_edge.quantize.recipes import COMPONENTS, Quant, QuantSettings, resolve_settings


def settings_from_dict(d) -> QuantSettings:
    """Inverse of `QuantSettings.as_dict` (what a quantized folder's config.json records)."""
    quants = {c: (Quant(int(d[c]["bits"]), int(d[c]["group_size"])) if d.get(c) else None)
              for c in COMPONENTS}
    return QuantSettings(**quants, recipe=str(d.get("recipe", "custom")))


BITS = {  # recipe -> bits of vision, connector, decoder, embed (None: float)
    "decoder4-vision8": (8, 8, 4, 8),
    "all8": (8, 8, 8, 8),
    "all4": (4, 4, 4, 4),
    "decoder4": (None, None, 4, 4),
}


@pytest.fixture(scope="module")
def recipe_runs(qsrc, tmp_path_factory):
    """Every recipe applied to the PG1 fixture, quality measured on 3 probes: {recipe: report}."""
    _, src = qsrc(1)
    root = tmp_path_factory.mktemp("recipes")
    return {r: quantize(src, root / r, r, probes=3, max_new_tokens=4) for r in RECIPES}


def model_inputs(pg, image=None, prompt="caption en"):
    inp = pg.prepare([image or shapes_image()], [prompt])
    return mx.array(inp.input_ids), mx.array(inp.pixel_values)


def logits(model, ids, pixels) -> np.ndarray:
    return np.array(model(ids, pixels)[0].astype(mx.float32))


def test_padded_width_of_the_real_and_the_fixture_siglip_mlp():
    assert [padded_width(4304, g) for g in (32, 64, 128)] == [4320, 4352, 4352]
    assert [padded_width(72, g) for g in (32, 64, 128)] == [96, 128, 128]
    assert padded_width(4352, 64) == 4352


@pytest.mark.parametrize("group_size", [32, 64])
def test_padding_the_siglip_mlp_leaves_float_outputs_unchanged(qsrc, group_size):
    _, src = qsrc(1)
    config = read_config(src)
    weights = load_weights(src, config)
    width = padded_width(72, group_size)
    ref = build_model(config, dict(weights))
    padded = build_model(read_config(src), {k: pad_vision_mlp(k, v, 72, width) for k, v in weights.items()})
    assert padded.config.vision.intermediate_size == width
    x = mx.random.uniform(-1, 1, (2, 28, 28, 3), key=mx.random.key(0))
    # The added hidden units are exactly zero after GELU, so fc2's added columns meet zeros.
    mlp = padded.vision_tower.vision_model.encoder.layers[0].mlp
    h = mlp.act(mlp.fc1(mx.random.normal((2, 16, 64), key=mx.random.key(1))))
    assert h.shape[-1] == width and not mx.any(h[..., 72:]).item()
    a, b = np.array(ref.vision_tower(x)), np.array(padded.vision_tower(x))
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()  # exact (0.0) on this CPU backend


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_gives_its_layer_types_bits_and_config(recipe_runs, recipe):
    report = recipe_runs[recipe]
    want = dict(zip(COMPONENTS, BITS[recipe]))
    model, _, folder = load_model(report.output)
    counted = {c: 0 for c in COMPONENTS}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        comp = component(path + ".weight")
        if "position_embedding" in path or isinstance(m, (nn.Conv2d, nn.LayerNorm)):
            assert type(m) in (nn.Embedding, nn.Conv2d, nn.LayerNorm), path  # always float
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            assert (m.bits, m.group_size) == (want[comp], 64), path
            counted[comp] += 1
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            assert want[comp] is None, f"{path} left float"
    embed = model.language_model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) == (want["embed"] is not None)
    for c in COMPONENTS:
        assert report.components[c].quantized_layers == counted[c]
        assert (counted[c] > 0) == (want[c] is not None)

    raw = json.loads((folder / "config.json").read_text())
    section = raw["quantization"]
    assert section == raw["quantization_config"]
    assert (section["bits"], section["group_size"], section["mode"]) == (want["decoder"], 64, "affine")
    for path, entry in section.items():
        if isinstance(entry, dict):
            assert entry["bits"] == want[component(path + ".weight")] != want["decoder"]
    record = raw["pg_edge"]["quantization"]
    assert settings_from_dict(record["settings"]).recipe == recipe
    assert record["vision_intermediate_size"] == 72
    width = 128 if want["vision"] else 72
    assert raw["vision_config"]["intermediate_size"] == record["padded_vision_intermediate_size"] == width
    # bits per weight count scales and biases (float32 here: +2*32/64 = 1 bit at group 64)
    embed_bpw = report.components["embed"].bits_per_weight
    assert embed_bpw == pytest.approx(want["embed"] + 1 if want["embed"] else 32.0)
    dec = report.components["decoder"].bits_per_weight
    assert want["decoder"] + 1 < dec < want["decoder"] + 1.5  # + float32 norms
    assert report.disk_bytes == sum(f.stat().st_size for f in folder.iterdir())


def test_save_load_round_trip_gives_identical_logits(qsrc, recipe_runs):
    """quantize_weights in memory == the written folder loaded back, tensor for tensor."""
    _, src = qsrc(1)
    report = recipe_runs[DEFAULT_RECIPE]
    config = read_config(src)
    qweights, raw = quantize_weights(config.raw, load_weights(src, config), settings_from_dict(report.settings))
    assert raw == json.loads((Path(report.output) / "config.json").read_text())
    in_memory = build_model(PaliGemmaConfig.from_dict(raw), qweights)
    pg = load(report.output)
    ids, pixels = model_inputs(pg)
    assert np.array_equal(logits(in_memory, ids, pixels), logits(pg.model, ids, pixels))
    on_disk = load_weights(Path(report.output), read_config(Path(report.output)))
    assert set(on_disk) == set(qweights)
    assert all(mx.array_equal(on_disk[k], qweights[k]).item() for k in qweights)


def test_8bit_stays_closer_to_float_than_4bit(recipe_runs):
    q = {r: recipe_runs[r].quality for r in RECIPES}
    assert q["all8"]["mean_kl"] < q[DEFAULT_RECIPE]["mean_kl"] < q["all4"]["mean_kl"]
    assert q["all8"]["max_rel_err"] < q["all4"]["max_rel_err"]
    assert q["all8"]["top1_agreement"] >= q["all4"]["top1_agreement"]
    assert q["all8"]["top1_agreement"] >= 0.95 and q["all8"]["mean_kl"] < 0.01
    # default vs decoder4 (mlx-vlm's mix) is NOT asserted: on random-weight fixtures their
    # order changes with the probe set, so it says nothing about real checkpoints.
    for report in recipe_runs.values():
        assert report.quality["positions"] == sum(p["metrics"]["positions"] for p in report.probes) > 3


def test_group_size_32_pads_to_96_and_round_trips(qsrc, tmp_path):
    _, src = qsrc(1)
    report = quantize(src, tmp_path / "g32", resolve_settings(group_size=32), probes=0)
    assert report.vision_mlp_width == (72, 96) and not report.left_float
    pg = load(tmp_path / "g32")
    fc2 = pg.model.vision_tower.vision_model.encoder.layers[1].mlp.fc2
    assert (fc2.bits, fc2.group_size, fc2.weight.shape[1] * 32 // 8) == (8, 32, 96)
    assert np.isfinite(pg.logits(stripes_image(), "caption en")).all()


def test_bfloat16_source_gives_bfloat16_scales_and_the_bits_bench_assumes(qsrc, tmp_path):
    """bench/quantize_sizes.py counts 8 + 2*16/64 = 8.5 and 4.5 bits per weight at group 64."""
    from pg_edge.convert.hf import convert_hf

    hf, _ = qsrc(1)
    src = convert_hf(hf, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    report = quantize(src, tmp_path / "q", probes=1, max_new_tokens=2)
    assert report.components["embed"].bits_per_weight == pytest.approx(8.5)
    pg = load(tmp_path / "q")
    embed = pg.model.language_model.model.embed_tokens
    assert embed.scales.dtype == embed.biases.dtype == mx.bfloat16
    assert report.quality["top1_agreement"] > 0.5


def test_siglip_width_comes_from_the_tensors_when_the_config_misstates_it(qsrc, tmp_path):
    """mlx-community configs have said 4352 for a 4304-wide MLP: the tensors decide."""
    import shutil

    _, src = qsrc(1)
    lying = shutil.copytree(src, tmp_path / "lying")
    raw = json.loads((lying / "config.json").read_text())
    raw["vision_config"]["intermediate_size"] = 96
    (lying / "config.json").write_text(json.dumps(raw))
    report = quantize(lying, tmp_path / "q", probes=0)
    assert report.vision_mlp_width == (72, 128)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["pg_edge"]["quantization"][
        "vision_intermediate_size"] == 72


def test_narrow_pg2_fixture_quantizes_what_divides_and_says_what_not(converted, tmp_path):
    """Widths 40/48 divide no group size: only SigLIP fc2 (72 padded to 128) and o_proj (64 wide)
    can be quantized; the rest stays float, is listed, and the model still runs."""
    report = quantize(converted(version=2), tmp_path / "q", probes=1, max_new_tokens=3)
    quantized = {p for p, m in tree_flatten(load(tmp_path / "q").model.leaf_modules(), is_leaf=nn.Module.is_module)
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert quantized and all(p.endswith(("mlp.fc2", "self_attn.o_proj")) for p in quantized)
    assert "language_model.model.embed_tokens" in report.left_float
    assert all("not a multiple of group size 64" in why for why in report.left_float.values())
    assert 0 <= report.quality["mean_kl"] < 1 and "left float" in report.to_text()


def test_pg_edge_quantized_folder_loads_in_mlx_vlm(recipe_runs):
    from mlx_vlm.utils import load_model as vlm_load

    folder = Path(recipe_runs[DEFAULT_RECIPE].output)  # vision 8-bit, MLP padded 72 -> 128
    vlm = vlm_load(folder)
    fc2 = vlm.vision_tower.vision_model.encoder.layers[0].mlp.fc2
    assert isinstance(fc2, nn.QuantizedLinear) and fc2.bits == 8
    assert isinstance(vlm.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    pg = load(folder)
    ids, pixels = model_inputs(pg)
    ours = logits(pg.model, ids, pixels)
    out = vlm(ids, pixels.transpose(0, 3, 1, 2), mask=mx.ones(ids.shape))
    theirs = np.array(getattr(out, "logits", out)[0].astype(mx.float32))
    m = compare_logits(ours[:, :257152], theirs[:, :257152])
    assert m["top1_agreement"] == 1.0 and m["max_rel_err"] < 1e-4, m


def test_numpy_reference_reads_the_quantized_folder_alike(recipe_runs):
    """An independent reader of the format (dequantizes in NumPy) gives pg_edge's logits."""
    from pg_edge.reference.model import ReferenceModel

    folder = recipe_runs[DEFAULT_RECIPE].output
    pg = load(folder)
    inp = pg.prepare([stripes_image()], ["ocr"])
    ref = ReferenceModel.from_folder(folder).logits(inp.input_ids, inp.pixel_values)[0]
    ours = logits(pg.model, mx.array(inp.input_ids), mx.array(inp.pixel_values))
    assert compare_logits(ref, ours)["max_rel_err"] < 1e-5


def test_mlx_vlm_quantized_folder_loads_in_pg_edge(qsrc, tmp_path):
    """mlx-vlm's 4-bit g64 conversion (decoder + embeddings, vision float) holds the same tensors
    as pg_edge's decoder4 recipe, so pg_edge gives identical logits from either folder."""
    from mlx_vlm.convert import convert
    from mlx_vlm.utils import load_model as vlm_load

    hf, src = qsrc(1)
    convert(hf_path=str(hf), mlx_path=str(tmp_path / "vlm"), quantize=True, q_bits=4, q_group_size=64)
    quantize(src, tmp_path / "ours", "decoder4", probes=0)
    theirs_w = load_weights(tmp_path / "vlm", read_config(tmp_path / "vlm"))
    ours_w = load_weights(tmp_path / "ours", read_config(tmp_path / "ours"))
    assert set(theirs_w) == set(ours_w)
    assert all(mx.array_equal(theirs_w[k], ours_w[k]).item() for k in ours_w)
    from_vlm, _, _ = load_model(tmp_path / "vlm")  # mlx-vlm writes no tokenizer.model: model only
    pg = load(tmp_path / "ours")
    ids, pixels = model_inputs(pg, stripes_image(), "answer en how many?")
    ours = logits(pg.model, ids, pixels)
    assert np.array_equal(ours, logits(from_vlm, ids, pixels))
    out = vlm_load(tmp_path / "vlm")(ids, pixels.transpose(0, 3, 1, 2), mask=mx.ones(ids.shape))
    theirs = np.array(getattr(out, "logits", out)[0].astype(mx.float32))
    assert compare_logits(ours[:, :257152], theirs[:, :257152])["max_rel_err"] < 1e-4


def test_cli_prints_the_report_as_text_and_json(qsrc, tmp_path, capsys):
    _, src = qsrc(2)
    out = tmp_path / "q8"
    assert main(["quantize", str(src), "-o", str(out), "--bits", "8", "--probes", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recipe"] == "all8" and set(d["components"]) == set(COMPONENTS)
    assert d["disk_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    assert d["components"]["embed"]["bits_per_weight"] == pytest.approx(9.0)
    assert set(d["quality"]) >= {"top1_agreement", "mean_kl", "max_rel_err"} and len(d["probes"]) == 1
    args = ["quantize", str(src), "-o", str(out), "--force", "--embed-bits", "4", "--vision-bits", "none", "--quiet"]
    assert main(args + ["--probes", "0"]) == 0
    text = capsys.readouterr().out
    assert "custom" in text and "bits/w" in text and "not measured" in text


@pytest.mark.parametrize("args, kwargs, message", [
    (["--bits", "3"], {"bits": 3}, "bits must be 4 or 8"),
    (["--group-size", "16"], {"group_size": 16}, "group size must be 32, 64 or 128"),
    (["--vision-bits", "2"], {"vision_bits": 2}, "vision bits must be 4, 8 or none"),
    (["--recipe", "all2"], {"recipe": "all2"}, "unknown recipe"),
])
def test_bad_settings_fail_cleanly_and_leave_nothing(qsrc, tmp_path, capsys, args, kwargs, message):
    _, src = qsrc(1)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with pytest.raises(PgEdgeError, match=message):
        quantize(src, tmp_path / "q", resolve_settings(**kwargs))
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_fail_cleanly_and_leave_nothing(qsrc, recipe_runs, tmp_path, capsys):
    hf, src = qsrc(1)
    out = tmp_path / "out"
    cases = [
        (recipe_runs["all8"].output, "already quantized"),
        (hf, "not a converted folder"),
        (tmp_path / "missing", "not found"),
        (src, "is the input"),
    ]
    for source, message in cases:
        dst = src if message == "is the input" else out
        with pytest.raises(CheckpointError if message != "is the input" else PgEdgeError, match=message):
            quantize(source, dst, probes=0)
        assert main(["quantize", str(source), "-o", str(dst), "--force"]) == 2
        assert message in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
    quantize(src, out, probes=0)
    with pytest.raises(PgEdgeError, match="exists"):
        quantize(src, out, probes=0)


def test_convert_and_quantize_in_one_step_equals_two_steps(qsrc, tmp_path, capsys):
    hf, src = qsrc(1)
    assert main(["convert", str(hf), "-o", str(tmp_path / "one"), "--dtype", "float32", "-q", "4",
                 "--probes", "0", "--quiet"]) == 0
    assert "bits" in capsys.readouterr().out  # the quantization report is printed
    quantize(src, tmp_path / "two", resolve_settings(bits=4), probes=0)
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    ca = json.loads((tmp_path / "one" / "config.json").read_text())
    cb = json.loads((tmp_path / "two" / "config.json").read_text())
    assert ca["quantization"] == cb["quantization"]
    for (ka, va), (kb, vb) in zip(sorted(tree_flatten(a.model.parameters())), sorted(tree_flatten(b.model.parameters()))):
        assert ka == kb and mx.array_equal(va, vb), ka
    assert [p.name for p in tmp_path.iterdir()] == ["one", "two"]  # no float folder left behind


def test_convert_with_bad_bits_writes_nothing(qsrc, tmp_path, capsys):
    hf, _ = qsrc(1)
    assert main(["convert", str(hf), "-o", str(tmp_path / "out"), "-q", "3"]) == 2
    assert "3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
