"""4/8-bit quantization of converted PaliGemma folders, mixed per component, with a measured
quality report (size, bits per weight, agreement with the float model on fixed probes).

    from pg_edge.quantize import quantize
    report = quantize("pg2-3b-224", "pg2-3b-224-q4")      # default recipe: decoder4-vision8
    print(report.to_text())
    quantize("pg2-3b-224", "pg2-q8", "all8")               # a recipe by name
    quantize("pg2-3b-224", "pg2-g32", resolve_settings(bits=4, group_size=32, vision_bits=None))

`pg-edge convert -q` passes `quantize` an HF checkpoint opened by `pg_edge.convert.hf.open_hf`: one
streamed pass, no float folder (a big_vision .npz goes through a temporary float folder).
`quantize_weights(config_raw, weights, settings)` quantizes an in-memory float checkpoint, and
`QuantPlan.apply` any subset of the tensors (`quantize` streams them through it one by one).
"""
from .folder import build_report, measure, quantize
from .plan import QuantPlan, padded_width, quantize_weights
from .recipes import DEFAULT_RECIPE, RECIPES, Quant, QuantSettings, resolve_settings
from .report import QuantizeReport, SizeCounter

__all__ = [
    "quantize", "measure", "quantize_weights", "QuantPlan", "padded_width", "Quant", "QuantSettings",
    "resolve_settings", "RECIPES", "DEFAULT_RECIPE", "QuantizeReport", "SizeCounter", "build_report",
]
