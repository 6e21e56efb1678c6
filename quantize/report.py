"""What a quantize run reports: size and bits per weight, overall and per component, and how
closely the quantized model follows the float one on the probes.

Bits per weight count everything stored for a component (packed weights, their scales and
biases, the tensors left float such as norms and the patch conv, and the SigLIP padding)
divided by the component's parameter count in the float source. So a 4-bit g64 matrix with
bf16 scales and biases costs 4 + 2*16/64 = 4.5 bits, before the float extras.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pg_edge.checkpoint.weights import component

from .recipes import COMPONENTS


@dataclass
class ComponentSize:
    params: int = 0  # float source parameters (before any padding)
    source_bytes: int = 0
    bytes: int = 0  # stored in the quantized folder
    quantized_layers: int = 0
    float_layers: int = 0  # layers the settings asked to quantize but that could not be
    setting: str = "float"

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def source_bits_per_weight(self) -> float:
        return 8 * self.source_bytes / self.params if self.params else 0.0


class SizeCounter:
    """Tallies tensors per component as shards stream through (source side, then quantized)."""

    def __init__(self) -> None:
        self.parts = {c: ComponentSize() for c in COMPONENTS}

    def add(self, source: dict, quantized: dict) -> None:
        """One shard: its float tensors and what `QuantPlan.apply` made of them."""
        for k, v in source.items():
            p = self.parts[component(k)]
            p.params += int(v.size)
            p.source_bytes += int(v.nbytes)
        for k, v in quantized.items():
            self.parts[component(k)].bytes += int(v.nbytes)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


@dataclass
class QuantizeReport:
    source: str
    output: str
    settings: dict
    components: dict[str, ComponentSize]
    source_disk_bytes: int
    disk_bytes: int
    vision_mlp_width: tuple[int, int]  # (original, padded)
    left_float: dict[str, str] = field(default_factory=dict)
    quality: dict | None = None  # pg_edge.eval.metrics.combine over all probes
    probes: list[dict] = field(default_factory=list)  # per probe: name, prompt, tokens, metrics
    seconds: float = 0.0
    quality_seconds: float = 0.0  # of `seconds`, spent scoring the probes

    # -- derived ---------------------------------------------------------------------------
    @property
    def params(self) -> int:
        return sum(c.params for c in self.components.values())

    @property
    def weight_bytes(self) -> int:
        return sum(c.bytes for c in self.components.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.params if self.params else 0.0

    @property
    def source_bits_per_weight(self) -> float:
        src = sum(c.source_bytes for c in self.components.values())
        return 8 * src / self.params if self.params else 0.0

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        comps = {}
        for name, c in self.components.items():
            d = asdict(c)
            d["bits_per_weight"] = round(c.bits_per_weight, 4)
            d["source_bits_per_weight"] = round(c.source_bits_per_weight, 4)
            comps[name] = d
        return {
            "source": self.source,
            "output": self.output,
            "recipe": self.settings.get("recipe"),
            "settings": self.settings,
            "disk_bytes": self.disk_bytes,
            "source_disk_bytes": self.source_disk_bytes,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "source_bits_per_weight": round(self.source_bits_per_weight, 4),
            "components": comps,
            "vision_mlp_width": {"original": self.vision_mlp_width[0], "padded": self.vision_mlp_width[1]},
            "left_float": self.left_float,
            "quality": self.quality,
            "probes": self.probes,
            "seconds": round(self.seconds, 2),
            "quality_seconds": round(self.quality_seconds, 2),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [
            f"quantized {self.source} -> {self.output}  (recipe {self.settings.get('recipe')}, "
            f"{self.seconds:.1f} s)",
            "",
            f"{'component':<10} {'setting':<16} {'params':>12} {'float MB':>10} {'quant MB':>10} "
            f"{'bits/w':>7} {'layers q/float':>15}",
        ]
        for name, c in self.components.items():
            lines.append(
                f"{name:<10} {c.setting:<16} {c.params:>12,} {c.source_bytes / 1e6:>10.2f} "
                f"{c.bytes / 1e6:>10.2f} {c.bits_per_weight:>7.2f} "
                f"{c.quantized_layers:>7}/{c.float_layers:<7}"
            )
        lines.append(
            f"{'total':<10} {'':<16} {self.params:>12,} "
            f"{sum(c.source_bytes for c in self.components.values()) / 1e6:>10.2f} "
            f"{self.weight_bytes / 1e6:>10.2f} {self.bits_per_weight:>7.2f}"
        )
        lines.append("")
        ratio = self.disk_bytes / self.source_disk_bytes if self.source_disk_bytes else 0.0
        lines.append(f"on disk: {self.disk_bytes / 1e6:.2f} MB (source {self.source_disk_bytes / 1e6:.2f} MB, "
                     f"{ratio:.1%})")
        w0, w1 = self.vision_mlp_width
        if w1 != w0:
            lines.append(f"SigLIP MLP width zero-padded {w0} -> {w1} (exact; config records both)")
        if self.left_float:
            reasons = sorted(set(self.left_float.values()))
            lines.append(f"{len(self.left_float)} layer(s) left float: " + "; ".join(reasons))
        if self.quality is None:
            lines.append("quality: not measured (no probes)")
            return "\n".join(lines)
        q = self.quality
        lines += [
            "",
            f"agreement with the float model, teacher-forced on {len(self.probes)} probe(s), "
            f"{q['positions']} positions ({self.quality_seconds:.1f} s of the {self.seconds:.1f} s):",
            f"{'probe':<18} {'prompt':<30} {'pos':>4} {'top-1':>7} {'mean KL':>10} {'max rel err':>12}",
        ]
        for p in self.probes:
            m = p["metrics"]
            lines.append(f"{p['name']:<18} {p['prompt'][:30]:<30} {m['positions']:>4} "
                         f"{m['top1_agreement']:>7.3f} {m['mean_kl']:>10.3g} {m['max_rel_err']:>12.3g}")
        lines.append(f"{'all':<18} {'':<30} {q['positions']:>4} {q['top1_agreement']:>7.3f} "
                     f"{q['mean_kl']:>10.3g} {q['max_rel_err']:>12.3g}")
        return "\n".join(lines)
