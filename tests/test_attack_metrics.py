"""attacks.metrics against scikit-learn, hand-computed curves and the binormal model."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from attacks.metrics import (
    AttackResult,
    RocCurve,
    advantage,
    auc,
    batched_auc,
    bootstrap_ci,
    evaluate_scores,
    roc_curve,
    tpr_at_fpr,
)

# Hand-made, by descending score: 0.9 M, 0.8 N, 0.7 M, 0.6 M, 0.5 N, 0.4 M, 0.3 N, 0.2 N.
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
HAND_MEMBER = np.array([1, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
HAND_FPR = (0, 0, 0.25, 0.25, 0.25, 0.5, 0.5, 0.75, 1)
HAND_TPR = (0, 0.25, 0.25, 0.5, 0.75, 0.75, 1, 1, 1)


def _binormal(n_pos: int, n_neg: int, d: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return scores, np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [3, 20, None])  # few levels = many ties; None = continuous
def test_roc_and_auc_match_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.normal(size=n) if levels is None else rng.integers(0, levels, n).astype(float)
    member = rng.random(n) < 0.3
    fpr, tpr, thr = sk_roc_curve(member, scores, drop_intermediate=False)
    curve = roc_curve(scores, member)
    np.testing.assert_allclose(curve.fpr, fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve.tpr, tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve.thresholds, thr)
    assert auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    # The rank-based AUC must also equal the trapezoid under our own curve.
    assert auc(scores, member) == pytest.approx(np.trapezoid(curve.tpr, curve.fpr), abs=1e-12)


def test_integer_labels_accepted() -> None:
    assert auc(HAND_SCORES, HAND_MEMBER.astype(int)) == auc(HAND_SCORES, HAND_MEMBER)


def test_hand_example_curve_auc_tpr_advantage() -> None:
    curve = roc_curve(HAND_SCORES, HAND_MEMBER)
    assert curve.fpr == HAND_FPR
    assert curve.tpr == HAND_TPR
    assert curve.thresholds[0] == math.inf
    # Member/non-member pairs won: 0.9 beats 4, 0.7 and 0.6 beat 3 each, 0.4 beats 2 -> 12 / 16.
    assert auc(HAND_SCORES, HAND_MEMBER) == 0.75
    assert tpr_at_fpr(curve, 0.0) == 0.25
    assert tpr_at_fpr(curve, 0.1) == 0.25
    assert tpr_at_fpr(curve, 0.25) == 0.75  # FPR <= target: the boundary point counts
    assert tpr_at_fpr(curve, 0.2499) == 0.25
    assert tpr_at_fpr(curve, 0.5) == 1.0
    assert advantage(curve) == 0.5  # 0.75 - 0.25 (and 1.0 - 0.5)


def test_batched_auc_rows_match_single_auc() -> None:
    rng = np.random.default_rng(3)
    member = rng.random(50) < 0.5
    rows = rng.integers(0, 5, (7, 50)).astype(float)
    expected = [roc_auc_score(member, row) for row in rows]
    np.testing.assert_allclose(batched_auc(rows, member), expected, atol=1e-12)


def test_bootstrap_ci_covers_true_auc_with_hanley_mcneil_width() -> None:
    d, n = 1.0, 1000
    scores, member = _binormal(n, n, d, seed=0)
    true_auc = norm.cdf(d / math.sqrt(2))  # binormal AUC, 0.760
    lo, hi = bootstrap_ci(scores, member, batched_auc, n=1000, seed=0, vectorized=True)
    assert lo < true_auc < hi
    assert lo < auc(scores, member) < hi
    # Hanley & McNeil (1982) standard error of the AUC, an independent width check.
    a = true_auc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_coverage_over_repeats() -> None:
    d, n, reps = 0.8, 100, 60
    true_auc = norm.cdf(d / math.sqrt(2))
    hits = 0
    for seed in range(reps):
        scores, member = _binormal(n, n, d, seed=100 + seed)
        lo, hi = bootstrap_ci(scores, member, batched_auc, n=300, seed=seed, vectorized=True)
        hits += lo < true_auc < hi
    assert hits / reps >= 0.85  # nominal 0.95; percentile bootstrap runs a little short


def test_bootstrap_vectorized_and_loop_agree_and_are_seeded() -> None:
    scores, member = _binormal(40, 60, 0.5, seed=1)
    vec = bootstrap_ci(scores, member, batched_auc, n=200, seed=5, vectorized=True)
    loop = bootstrap_ci(scores, member, auc, n=200, seed=5)
    assert vec == pytest.approx(loop, abs=1e-12)
    assert bootstrap_ci(scores, member, auc, n=200, seed=6) != loop


def test_bootstrap_is_stratified() -> None:
    scores, member = _binormal(30, 70, 0.5, seed=2)
    members, nonmembers = set(scores[member]), set(scores[~member])

    def member_slots_hold_only_members(s: np.ndarray, m: np.ndarray) -> float:
        assert m.sum() == 30  # class sizes kept
        return float(set(s[m]) <= members and set(s[~m]) <= nonmembers)

    assert bootstrap_ci(scores, member, member_slots_hold_only_members, n=50) == (1.0, 1.0)


def test_bootstrap_speed() -> None:
    scores, member = _binormal(1000, 1000, 1.0, seed=0)
    start = time.perf_counter()
    bootstrap_ci(scores, member, batched_auc, n=1000, vectorized=True)
    assert time.perf_counter() - start < 1.0


def test_roc_curve_save_load_strict_json(tmp_path) -> None:
    curve = roc_curve(HAND_SCORES, HAND_MEMBER)
    path = tmp_path / "roc.json"
    curve.save(path)
    # Strict JSON: no bare Infinity/NaN tokens.
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    loaded = RocCurve.load(path)
    assert loaded == curve
    assert hash(loaded) == hash(curve)
    with pytest.raises(AttributeError):
        curve.fpr = ()  # type: ignore[misc]


def test_evaluate_scores_fields_and_round_trip(tmp_path) -> None:
    scores, member = _binormal(500, 1000, 1.0, seed=4)
    result = evaluate_scores("loss", scores, member, delta=1e-5, bootstrap=200)
    assert result.auc == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    assert result.auc_ci[0] < result.auc < result.auc_ci[1]
    fpr, tpr, _ = sk_roc_curve(member, scores, drop_intermediate=False)
    assert result.tpr_at_1pct_fpr == tpr[fpr <= 0.01].max()
    assert result.tpr_at_01pct_fpr == tpr[fpr <= 0.001].max()
    assert result.advantage == pytest.approx((tpr - fpr).max())
    assert (result.num_members, result.num_nonmembers) == (500, 1000)
    assert result.low_fpr_reliable == {"tpr_at_1pct_fpr": True, "tpr_at_01pct_fpr": False}
    assert result.epsilon_lb_clopper_pearson > 0 and result.epsilon_lb_gdp > 0
    path = tmp_path / "result.json"
    result.save(path)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    assert AttackResult.load(path) == result


def test_low_fpr_reliability_threshold() -> None:
    scores, member = _binormal(10, 999, 1.0, seed=5)
    result = evaluate_scores("x", scores, member, delta=1e-5, bootstrap=10)
    assert result.low_fpr_reliable["tpr_at_1pct_fpr"] is False


@pytest.mark.parametrize(
    ("scores", "member", "match"),
    [
        ([0.1, 0.2, 0.3], [0, 0, 0], "both members and non-members"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "both members and non-members"),
        ([0.1, np.nan, 0.3], [1, 0, 1], "NaN"),
        ([0.1, np.inf, 0.3], [1, 0, 1], "NaN/inf"),
        ([0.1, 0.2, 0.3], [1, 0], "differ in shape"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
        ([0.1, 0.2, 0.3], [1, 0, 2], "boolean or 0/1"),
        ([], [], "empty"),
    ],
)
def test_bad_input_raises(scores, member, match) -> None:
    for fn in (roc_curve, auc):
        with pytest.raises(ValueError, match=match):
            fn(scores, member)
    with pytest.raises(ValueError, match=match):
        evaluate_scores("bad", scores, member, delta=1e-5, bootstrap=10)


def test_bad_parameters_raise() -> None:
    curve = roc_curve(HAND_SCORES, HAND_MEMBER)
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(curve, 1.5)
    with pytest.raises(ValueError, match="replicate"):
        bootstrap_ci(HAND_SCORES, HAND_MEMBER, auc, n=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(HAND_SCORES, HAND_MEMBER, auc, confidence=1.0)
    with pytest.raises(ValueError, match="same length"):
        RocCurve(fpr=(0.0, 1.0), tpr=(0.0,), thresholds=(math.inf, 0.0))


def test_a_statistic_that_runs_backwards_is_reported_with_its_flipped_auc():
    from attacks.audit import reversed_statistics

    rng = np.random.default_rng(0)
    is_member = np.repeat([True, False], 200)
    backwards = np.where(is_member, -1.0, 0.0) + rng.normal(size=400)  # members score lower
    noise = rng.normal(size=400)
    results = {name: evaluate_scores(name, s, is_member, delta=1e-5, bootstrap=200)
               for name, s in (("backwards", backwards), ("chance", noise))}
    flagged = reversed_statistics(results)
    assert set(flagged) == {"backwards"}
    assert flagged["backwards"] == pytest.approx(1 - results["backwards"].auc) and flagged["backwards"] > 0.7
