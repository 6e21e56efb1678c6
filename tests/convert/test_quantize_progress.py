"""The quantize quality report shows progress per probe and states its share of the time; a
bf16 quantized folder loaded on the CPU gets the CPU variants (pg_edge.cpu): fast quantized
products, float32 activations, prefill layer by layer."""
import mlx.core as mx
import numpy as np

from pg_edge import cpu, load
from pg_edge.cpu.layers import CpuGemmaModel, CpuPaliGemmaModel, CpuSiglipEncoder
from pg_edge.cpu.products import CpuQuantizedLinear
from pg_edge.benchmark import bench_image
from pg_edge.quantize import quantize


def test_quality_report_progress_and_share(qsrc, tmp_path, capsys, monkeypatch):
    from pg_edge.convert.hf import convert_hf

    hf, _ = qsrc(2)
    src = convert_hf(hf, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    report = quantize(src, tmp_path / "q", probes=2, max_new_tokens=2, quiet=False)
    err = capsys.readouterr().err
    assert "quality report [0/4] float model, first probe" in err  # before the first, slow pass
    assert "quality report [1/4] float model" in err and "quality report [4/4] quantized model" in err
    assert 0 < report.quality_seconds <= report.seconds
    assert f"({report.quality_seconds:.1f} s of the {report.seconds:.1f} s)" in report.to_text()
    assert report.to_dict()["quality_seconds"] == round(report.quality_seconds, 2)
    pg = load(tmp_path / "q")
    if cpu.policy() == "cpu":
        assert type(pg.model) is CpuPaliGemmaModel  # float32 activations
        assert pg.model.embed(mx.array([[2, 3]]), None).dtype == mx.float32
        assert type(pg.model.language_model.model) is CpuGemmaModel  # prefill layer by layer
        assert type(pg.model.vision_tower.vision_model.encoder) is CpuSiglipEncoder
        assert isinstance(pg.model.language_model.model.layers[0].mlp.up_proj, CpuQuantizedLinear)
    # The quantized function computed in float32 throughout is the truth; the CPU policy's
    # float32 activations land closer to it than MLX's bf16 path does.
    image = bench_image(64)
    monkeypatch.setenv("PG_EDGE_QMM", "native")
    truth = load(tmp_path / "q", dtype=mx.float32).logits(image, "caption en")
    native = load(tmp_path / "q").logits(image, "caption en")
    ours = pg.logits(image, "caption en")
    err_ours, err_native = np.abs(ours - truth).max(), np.abs(native - truth).max()  # 1.1% vs 4.8% here
    assert err_ours <= err_native
    assert err_ours <= 0.02 * np.abs(truth).max()
