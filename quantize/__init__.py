"""4/8-bit quantization of converted PaliGemma folders, mixed per component, with a measured
quality report (size, bits per weight, agreement with the float model on fixed probes).

    from quantize import quantize
    report = quantize("pg2-3b-224", "pg2-3b-224-q4")      # default recipe: decoder4-vision8
    print(report.to_text())

For converting and quantizing in one step, `quantize_weights(config_raw, weights, settings)`
works on an in-memory float checkpoint, and `QuantPlan.apply` on one shard at a time.
"""
from .folder import build_report, measure, quantize
from .plan import QuantPlan, padded_width, quantize_weights
from .recipes import DEFAULT_RECIPE, RECIPES, Quant, QuantSettings, resolve_settings
from .report import QuantizeReport, SizeCounter

__all__ = [
    "quantize", "measure", "quantize_weights", "QuantPlan", "padded_width", "Quant", "QuantSettings",
    "resolve_settings", "RECIPES", "DEFAULT_RECIPE", "QuantizeReport", "SizeCounter", "build_report",
]
