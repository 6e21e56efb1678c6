"""Evaluation tooling: how close a model computes to what it should.

    probes.py   fixed probe inputs (bundled photos, drawn images) and teacher-forced scoring
    metrics.py  logit comparisons: top-1 agreement, KL, largest absolute / relative error
    verify.py   `pg-edge verify`: a folder against the NumPy reference, or against its float source

`pg-edge quantize` measures its report with probes and metrics too.
"""
