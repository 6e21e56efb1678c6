"""`quantize(src, dst)`: a float converted folder -> a quantized converted folder + a report.

    report = quantize("pg2-3b-224", "pg2-3b-224-q", "decoder4-vision8")    # or a QuantSettings
    print(report.to_text())

Steps: check the source (a pg_edge / mlx-vlm float folder: safetensors marked `format: mlx`,
no quantization yet, tensor shapes matching the config) from the file headers; plan every
output tensor's dtype and shape through a `QuantPlan` and check that every tensor the loaders
will ask for is there with its shape, before anything is read or written; stream the tensors
one at a time (big ones in row blocks) through the plan into a `FolderWriter`
(pg_edge.checkpoint.stream_convert: memory stays near a few 32 MB blocks; atomic: a failed run leaves no
output); then measure: the float model answers the probes and is scored teacher-forced, it is
released, and the quantized folder, loaded back exactly as a user would load it, is scored on
the same tokens. `pg-edge convert -q` passes an HF checkpoint opened by `pg_edge.convert.hf.open_hf`
instead of a folder: converted and quantized in one pass, and the float model of the report
is that checkpoint loaded with the same cast.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from pg_edge.model.config import PaliGemmaConfig
from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.checkpoint.folder import (FolderWriter, Progress, check_output, is_quantized, read_config,
                                        resolve)
from pg_edge.eval.metrics import combine, compare_logits
from pg_edge.checkpoint.stream_convert import Source, open_source, output_shapes, write
from pg_edge.checkpoint.stream_convert import plan as stream_plan
from pg_edge.checkpoint.weights import component
from pg_edge.demo import float_source_note

from pg_edge.eval import probes as probes_mod
from .plan import QuantPlan
from .recipes import QuantSettings, resolve_settings
from .report import QuantizeReport, SizeCounter, folder_bytes


def open_converted(folder: Path, raw: dict) -> Source:
    """A float converted folder as a stream source (headers read and checked, no tensor read);
    refuses, naming the reason, anything this tool cannot quantize."""
    if is_quantized(raw):
        raise CheckpointError(f"{folder} is already quantized; quantize its float source instead"
                              + float_source_note(folder))
    tie = PaliGemmaConfig.from_dict(raw).tie_word_embeddings
    source = open_source(folder, tie=tie, mlx_layout=True)
    try:
        for reader in source.readers:
            f = reader.path
            if reader.metadata.get("format") != "mlx":
                raise CheckpointError(
                    f"{folder} is not a converted folder ({f.name} is not marked format: mlx); run "
                    "`pg-edge convert` first, or `pg-edge convert -q 4` to convert and quantize"
                )
            scales = [e.name for e in reader.entries if e.name.endswith(".scales")]
            if scales:
                raise CheckpointError(f"{folder} is already quantized ({scales[0]} in {f.name})")
    except BaseException:
        source.close()
        raise
    source.raw = raw
    return source


def quantize(
    src: str | os.PathLike | Source,
    dst: str | os.PathLike,
    settings: QuantSettings | str | None = None,
    *,
    force: bool = False,
    probes: int | list | None = None,
    max_new_tokens: int = 8,
    quiet: bool = True,
) -> QuantizeReport:
    """Quantize the float converted folder `src` into `dst`; returns the report. `src` may
    also be a source opened by `pg_edge.convert.hf.open_hf` (an HF checkpoint, cast as it is read:
    `pg-edge convert -q` in one pass, no float folder written); it is not closed here.

    settings: what to quantize and how, from `resolve_settings(bits=..., group_size=...,
    vision_bits=..., recipe=...)`; a recipe name (a key of RECIPES) for that recipe as it is;
    None for DEFAULT_RECIPE. probes: None for the 4 built-in probes, a
    number of them (0: size report only), or a list of probes.Probe; max_new_tokens: greedy
    tokens per probe that both models are then scored on.
    Raises PgEdgeError / CheckpointError on bad settings or a source it cannot quantize.
    """
    t0 = time.perf_counter()
    if not isinstance(settings, QuantSettings):
        settings = resolve_settings(recipe=settings)
    if isinstance(src, Source):
        source, name, owned = src, src.name, False
    else:
        folder = resolve(src)
        source, name, owned = None, str(src), True
    inputs = [source.folder if source else folder]
    out = check_output(dst, force, kind="model", inputs=inputs)  # not the source, nor in or around it
    try:
        if source is None:
            source = open_converted(folder, read_config(folder).raw)
        probe_list = probes_mod.resolve_probes(probes)
        if probe_list:
            from pg_edge.inputs.processor import Tokenizer

            Tokenizer(source.folder)  # the probes need it: fail now rather than after writing
        specs = source.float_specs()
        tie = PaliGemmaConfig.from_dict(source.raw).tie_word_embeddings
        plan = QuantPlan.build(source.raw, settings, tie=tie, shapes={k: s.shape for k, s in specs.items()})
        planned = stream_plan(source, plan.apply)  # every output's dtype and shape, nothing read
        plan.check_complete(output_shapes(planned))  # before anything is written
        sizes = SizeCounter()
        for _, items in planned:
            for p in items:
                sizes.add({p.tensor.key: p.float_spec}, p.outputs)
        with FolderWriter(out, force=force, source=name, converter="quantize", inputs=inputs) as writer:
            write(planned, writer, Progress(len(planned), "quantize", quiet), transform=plan.apply)
            writer.finish(plan.config_dict(), source_folder=source.folder)
    finally:
        if owned and source is not None:
            source.close()
    return build_report(plan, sizes, source=name, source_folder=source.folder, output=out,
                        probe_list=probe_list, max_new_tokens=max_new_tokens, started=t0, quiet=quiet,
                        float_dtype=source.dtype)


def build_report(plan: QuantPlan, sizes: SizeCounter, *, source: str, source_folder: Path, output: Path,
                 probe_list: list, max_new_tokens: int = 8, started: float | None = None,
                 quiet: bool = True, float_dtype=None) -> QuantizeReport:
    """The report of a finished run: sizes per component from `sizes`, and the probes scored on
    `output` against `source_folder` (the float model: any folder pg_edge loads, its floating
    weights cast to `float_dtype` unless None)."""
    for name, part in sizes.parts.items():
        q = plan.settings.for_component(name)
        part.setting = str(q) if q else "float"
        part.quantized_layers = sum(1 for p in plan.targets if component(p + ".weight") == name)
        part.float_layers = sum(1 for p in plan.left_float if component(p + ".weight") == name)
    report = QuantizeReport(
        source=source, output=str(output), settings=plan.settings.as_dict(), components=sizes.parts,
        source_disk_bytes=folder_bytes(source_folder), disk_bytes=folder_bytes(output),
        vision_mlp_width=plan.vision_width, left_float=dict(plan.left_float),
    )
    if probe_list:
        t = time.perf_counter()
        report.quality, report.probes = measure(source_folder, output, probe_list, max_new_tokens, quiet,
                                                float_dtype=float_dtype)
        report.quality_seconds = time.perf_counter() - t
    report.seconds = time.perf_counter() - started if started is not None else 0.0
    return report


def measure(float_folder: Path, quant_folder: Path, probe_list: list, max_new_tokens: int = 8,
            quiet: bool = True, float_dtype=None) -> tuple[dict, list[dict]]:
    """Teacher-forced agreement of the quantized folder with the float one on the probes:
    (combined metrics, per-probe rows). float_dtype: cast the float model's weights to it
    (an HF source as `pg-edge convert -q --dtype` converts it). One model in memory at a
    time; progress per probe."""
    from pg_edge.pipeline import load

    n = len(probe_list)
    progress = Progress(2 * n, "quality report", quiet)
    # A probe is a whole forward pass: at full size on a slow backend the first one takes
    # minutes, so say what is running before it rather than after.
    progress.update(0, "float model, first probe")
    ref_pg = load(float_folder, dtype=float_dtype)
    reference = []
    for i, probe in enumerate(probe_list, 1):
        reference += probes_mod.teacher_forced(ref_pg, [probe], max_new_tokens)
        progress.update(i, f"float model, probe {probe.name}")
    del ref_pg
    gc.collect()
    quant_pg = load(quant_folder)
    got = []
    for i, s in enumerate(reference, 1):
        got += probes_mod.rescore(quant_pg, [s])
        progress.update(n + i, f"quantized model, probe {s.probe.name}")
    rows = []
    for s, logits in zip(reference, got):
        m = compare_logits(s.logits, logits)
        rows.append({"name": s.probe.name, "prompt": s.probe.prompt, "tokens": s.generated, "metrics": m})
    return combine(r["metrics"] for r in rows), rows
