"""pg_edge.eval.metrics: the numbers `pg-edge quantize` reports and `pg-edge verify` checks."""
import numpy as np
import pytest

from pg_edge.eval.metrics import combine, compare_logits, kl_divergence, log_softmax, max_rel_err, top1_agreement, within


def test_identical_logits_agree_perfectly():
    x = np.random.default_rng(0).normal(size=(5, 11)) * 10
    m = compare_logits(x, x.copy())
    assert m == {"positions": 5, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0,
                 "max_abs_err": 0.0, "max_rel_err": 0.0}
    assert compare_logits(x, x + 3.0)["mean_kl"] == pytest.approx(0.0, abs=1e-12)  # softmax is shift-free


def test_kl_matches_a_hand_computed_value_and_is_directed():
    ref, got = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert kl_divergence(ref, got)[0] == pytest.approx(want)
    assert kl_divergence(got, ref)[0] != pytest.approx(want)  # KL(float || quant), not the reverse
    assert np.exp(log_softmax([1000.0, 0.0])).sum() == pytest.approx(1.0)  # no overflow


def test_top1_max_rel_err_and_one_dimensional_input():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    got = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert top1_agreement(ref, got) == 0.5
    assert max_rel_err(ref, got) == pytest.approx(1.0 / 3.0)
    assert compare_logits(ref[0], got[0])["positions"] == 1
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, got[:1])


def test_combine_weights_by_positions_and_within_names_broken_limits():
    a = {"positions": 1, "top1_agreement": 0.0, "mean_kl": 1.0, "max_kl": 1.0, "max_abs_err": 2.0, "max_rel_err": 0.1}
    b = {"positions": 3, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0, "max_abs_err": 0.5, "max_rel_err": 0.3}
    c = combine([a, b])
    assert (c["positions"], c["top1_agreement"], c["mean_kl"], c["max_rel_err"]) == (4, 0.75, 0.25, 0.3)
    assert within(c, min_top1=0.7, max_kl=0.3, max_rel=0.5) == []
    assert len(within(c, min_top1=0.8, max_kl=0.1, max_rel=0.2)) == 3
