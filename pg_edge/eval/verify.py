"""`pg-edge verify`: does a converted (or quantized) folder still compute what it should?

Two questions, one procedure (probes and metrics shared with the quantization report):

* `verify(MODEL)`: the MLX model against the NumPy reference (pg_edge.reference, which shares
  no code with MLX) on the same weights. Both run in float32; a correct conversion agrees to
  float rounding, a broken one (a transposed or permuted weight) by nothing like it.
* `verify(MODEL, against=SOURCE)`: MODEL against the checkpoint it came from — the original
  Hugging Face folder or hub id (this is what catches a broken conversion: a permuted or
  transposed weight), or for a quantized MODEL its float folder — once through MLX and once
  through the reference (which reads HF layouts and dequantizes in NumPy), so a conversion or
  quantization problem and an MLX kernel problem can be told apart.

Per probe (image + task prompt): the trusted side generates `max_tokens` greedily; both sides
score prompt + those tokens in one teacher-forced pass; we compare the logits of the last
prompt position and every generated position (top-1 agreement, mean KL(trusted || tested),
max |logit error| / max |logit|), and whether free greedy decoding gives the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import metrics
from ..errors import PgEdgeError
from ..checkpoint.folder import is_quantized
from ..model.masks import suffix_mask_ar
from ..pipeline import PaliGemma, load
from .probes import Probe, Scored, resolve_probes, score, teacher_forced
from ..reference import ReferenceModel

# A correct float conversion agrees to ~1e-6 of the logit scale; float32 accumulation over
# a 27+26-layer model stays far below these. A single transposed weight breaks all three.
REFERENCE_LIMITS = {"min_top1": 0.95, "max_kl": 1e-3, "max_rel": 1e-2}
# A float conversion against its source: bf16 rounding alone costs ~1e-2 of the logit scale
# (measured on the fixtures: 3e-3 PG1, 1.2e-2 PG2); a permuted weight costs far more.
CONVERSION_LIMITS = {"min_top1": 0.9, "max_kl": 1e-2, "max_rel": 5e-2}
# Quantized vs float: 8-bit real checkpoints keep top-1 near 1; 4-bit lower. Flags override.
QUANTIZED_LIMITS = {"min_top1": 0.75, "max_kl": 0.5, "max_rel": None}


@dataclass
class VerifyReport:
    model: str
    against: str | None
    probes: list[dict]
    mlx: dict  # combined metrics, tested MLX model vs its trusted counterpart
    reference: dict | None  # against only: quantized reference vs float reference
    greedy_agreement: float
    limits: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"model": self.model, "against": self.against, "passed": self.passed,
                "failures": self.failures, "limits": self.limits, "mlx": self.mlx,
                "reference": self.reference, "greedy_agreement": self.greedy_agreement,
                "probes": self.probes}


def _reference_logits(ref: ReferenceModel, pg: PaliGemma, s: Scored) -> np.ndarray:
    """float32[T - start, V_real] from the NumPy model on the sequence `s`."""
    pixels = pg.prepare([s.probe.image()], [""]).pixel_values
    out = ref.logits(s.ids[None], pixels, mask_ar=s.mask_ar[None])
    return out[0, s.start:, : pg.config.real_vocab_size].astype(np.float32)


def _reference_teacher(ref: ReferenceModel, pg: PaliGemma, probe: Probe, max_tokens: int) -> Scored:
    """The reference's own greedy continuation of a probe, and its logits on it."""
    image = probe.image()
    inp = pg.prepare([image], [probe.prompt])
    prompt = inp.input_ids[0]
    gen = ref.greedy(prompt, inp.pixel_values, max_tokens, eos_id=pg.tokenizer.eos_id,
                     vocab_limit=pg.config.real_vocab_size)
    ids = np.concatenate([prompt, np.asarray(gen, dtype=prompt.dtype)])
    mask_ar = suffix_mask_ar(len(prompt), len(gen))
    s = Scored(probe, ids, mask_ar, len(prompt) - 1, list(gen), None)
    s.logits = _reference_logits(ref, pg, s)
    return s


def _greedy_same(pg: PaliGemma, s: Scored, max_tokens: int) -> bool:
    want = [t for t in s.generated if t != pg.tokenizer.eos_id]
    return pg.generate(s.probe.image(), s.probe.prompt, max_tokens=max_tokens).tokens == want


def _limits(defaults: dict, overrides: dict | None) -> dict:
    out = dict(defaults)
    for k, v in (overrides or {}).items():
        if v is not None:
            out[k] = v
    return out


def verify(model: str, against: str | None = None, *, probes=None, max_tokens: int = 8,
           limits: dict | None = None) -> VerifyReport:
    """Run the comparison; `limits` may set min_top1, max_kl, max_rel (None keeps the default)."""
    if max_tokens < 1:
        raise PgEdgeError(f"--max-tokens must be >= 1, got {max_tokens}")
    probe_list = resolve_probes(probes)
    if not probe_list:
        raise PgEdgeError("no probes to run")
    tested = load(model, dtype=mx.float32)
    rows, mlx_results, ref_results, same = [], [], [], []
    if against is None:
        lim = _limits(REFERENCE_LIMITS, limits)
        ref = ReferenceModel.from_folder(tested.folder)
        for probe in probe_list:
            s = _reference_teacher(ref, tested, probe, max_tokens)
            m = metrics.compare_logits(s.logits, score(tested, probe.image(), s.ids, s.mask_ar, s.start))
            ok = _greedy_same(tested, s, max_tokens)
            mlx_results.append(m)
            same.append(ok)
            rows.append({"probe": probe.name, "prompt": probe.prompt, "mlx": m, "greedy_same": ok})
    else:
        quantized = is_quantized(tested.config.raw)
        lim = _limits(QUANTIZED_LIMITS if quantized else CONVERSION_LIMITS, limits)
        trusted = load(against, dtype=mx.float32)
        if is_quantized(trusted.config.raw):
            raise PgEdgeError(f"--against {against} is quantized; give the float model")
        ref_q, ref_f = ReferenceModel.from_folder(tested.folder), ReferenceModel.from_folder(trusted.folder)
        for s in teacher_forced(trusted, probe_list, max_tokens):
            m = metrics.compare_logits(s.logits, score(tested, s.probe.image(), s.ids, s.mask_ar, s.start))
            r = metrics.compare_logits(_reference_logits(ref_f, trusted, s), _reference_logits(ref_q, tested, s))
            ok = _greedy_same(tested, s, max_tokens)
            mlx_results.append(m)
            ref_results.append(r)
            same.append(ok)
            rows.append({"probe": s.probe.name, "prompt": s.probe.prompt, "mlx": m, "reference": r,
                         "greedy_same": ok})
    combined = metrics.combine(mlx_results)
    report = VerifyReport(model=str(model), against=None if against is None else str(against), probes=rows,
                          mlx=combined, reference=metrics.combine(ref_results) if ref_results else None,
                          greedy_agreement=float(np.mean(same)), limits=lim)
    report.failures = metrics.within(combined, min_top1=lim["min_top1"], max_kl=lim["max_kl"],
                                     max_rel=lim["max_rel"])
    if report.reference is not None:
        report.failures += [f"reference: {f}" for f in metrics.within(
            report.reference, min_top1=lim["min_top1"], max_kl=lim["max_kl"], max_rel=lim["max_rel"])]
    return report


def format_report(r: VerifyReport) -> str:
    """The table `pg-edge verify` prints."""
    what = f"against {r.against}" if r.against else "against the NumPy reference on the same weights"
    lines = [f"pg-edge verify {r.model} {what}: {len(r.probes)} probes", "",
             f"{'probe':<28} {'side':<9} {'pos':>4} {'top-1':>6} {'mean KL':>9} {'max rel err':>11}  greedy"]

    def row(name, side, m, greedy=""):
        return (f"{name:<28.28} {side:<9} {m['positions']:>4} {m['top1_agreement']:>6.3f} "
                f"{m['mean_kl']:>9.2e} {m['max_rel_err']:>11.2e}  {greedy}").rstrip()

    for p in r.probes:
        lines.append(row(p["probe"], "mlx", p["mlx"], "same" if p["greedy_same"] else "differs"))
        if "reference" in p:
            lines.append(row("", "reference", p["reference"]))
    lines.append(row("overall", "mlx", r.mlx, f"{r.greedy_agreement:.0%} same"))
    if r.reference is not None:
        lines.append(row("overall", "reference", r.reference))
    lim = r.limits
    parts = [f"top-1 >= {lim['min_top1']}", f"mean KL <= {lim['max_kl']}"]
    if lim.get("max_rel") is not None:
        parts.append(f"max rel err <= {lim['max_rel']}")
    verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)
    lines += ["", f"limits: {', '.join(parts)} -> {verdict}"]
    return "\n".join(lines)
