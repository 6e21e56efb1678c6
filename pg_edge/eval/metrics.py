"""How close one model's logits are to another's: the numbers `pg-edge quantize` reports and
`pg-edge verify` checks, computed by the same code so that the two can never disagree.

Pure NumPy over logits arrays (no MLX): `ref` is the trusted model (float weights, or the
reference implementation), `got` the one under test, both float[T, V] for T scored positions
(a float[V] is one position). Everything is computed in float64.

    m = compare_logits(ref, got)      # {"positions", "top1_agreement", "mean_kl", "max_kl",
                                      #  "max_abs_err", "max_rel_err"}
    total = combine([m1, m2, ...])    # the same keys over all positions of several probes
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

METRIC_KEYS = ("positions", "top1_agreement", "mean_kl", "max_kl", "max_abs_err", "max_rel_err")


def _as_2d(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"logits must be float[T, V] or float[V], got shape {a.shape}")
    return a


def log_softmax(logits) -> np.ndarray:
    """float[T, V] -> log-probabilities float64[T, V] (max-subtracted, so no overflow)."""
    x = _as_2d(logits)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref, got) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per position, float64[T], in nats (>= 0).

    The direction matters: weighting by the reference's probabilities measures how much of
    what the trusted model believes the tested one loses (it is large when the tested model
    puts little mass on the reference's likely tokens)."""
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(kl, 0.0)  # rounding can give -1e-17


def top1_agreement(ref, got) -> float:
    """Fraction of positions where both models rank the same token first."""
    r, g = _as_2d(ref), _as_2d(got)
    return float((r.argmax(-1) == g.argmax(-1)).mean())


def max_rel_err(ref, got) -> float:
    """max |got - ref| / max |ref| over all positions and tokens: the largest logit error as a
    fraction of the logit scale (per-element relative error explodes near zero logits)."""
    r, g = _as_2d(ref), _as_2d(got)
    scale = float(np.abs(r).max())
    return float(np.abs(g - r).max() / scale) if scale > 0 else float(np.abs(g - r).max())


def compare_logits(ref, got) -> dict:
    """Agreement of `got` with `ref`, both float[T, V] (or float[V]) over the same positions.

    Returns {"positions": T, "top1_agreement": fraction, "mean_kl": nats, "max_kl": nats,
    "max_abs_err": logits, "max_rel_err": fraction of max |ref|}.
    """
    r, g = _as_2d(ref), _as_2d(got)
    if r.shape != g.shape:
        raise ValueError(f"logits shapes differ: ref {r.shape} vs got {g.shape}")
    kl = kl_divergence(r, g)
    return {
        "positions": int(r.shape[0]),
        "top1_agreement": top1_agreement(r, g),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "max_abs_err": float(np.abs(g - r).max()),
        "max_rel_err": max_rel_err(r, g),
    }


def combine(results: Iterable[Mapping]) -> dict:
    """Several `compare_logits` results -> one over all their positions: agreement and mean KL
    weighted by positions, maxima as maxima."""
    rs = list(results)
    if not rs:
        raise ValueError("nothing to combine")
    n = sum(r["positions"] for r in rs)
    return {
        "positions": n,
        "top1_agreement": sum(r["top1_agreement"] * r["positions"] for r in rs) / n,
        "mean_kl": sum(r["mean_kl"] * r["positions"] for r in rs) / n,
        "max_kl": max(r["max_kl"] for r in rs),
        "max_abs_err": max(r["max_abs_err"] for r in rs),
        "max_rel_err": max(r["max_rel_err"] for r in rs),
    }


def within(result: Mapping, *, min_top1: float | None = None, max_kl: float | None = None,
           max_rel: float | None = None) -> list[str]:
    """Which of the given limits `result` breaks, as readable lines (empty list: all met)."""
    bad = []
    if min_top1 is not None and result["top1_agreement"] < min_top1:
        bad.append(f"top-1 agreement {result['top1_agreement']:.3f} < {min_top1}")
    if max_kl is not None and result["mean_kl"] > max_kl:
        bad.append(f"mean KL {result['mean_kl']:.3g} > {max_kl}")
    if max_rel is not None and result["max_rel_err"] > max_rel:
        bad.append(f"max relative logit error {result['max_rel_err']:.3g} > {max_rel}")
    return bad
