"""Membership-inference metrics: exact ROC, AUC, TPR at low FPR, advantage, and result records.

Convention (as in tensorflow/privacy's `membership_inference_attack` and jax_privacy `auditing.py`):
`scores` is a 1-D float array of shape (N,), higher = more likely a member; `is_member` is a bool
(or 0/1) array of shape (N,). An attack whose natural statistic is lower for members (a denoising
loss) negates it before calling. Everything here is pure; `save` is the only writer and plotting
lives elsewhere.

Low-FPR figures follow Carlini et al. (S&P 2022, LiRA): TPR at FPR alpha only means something with
roughly 10/alpha non-members, which `AttackResult.low_fpr_reliable` records.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from attacks.empirical_epsilon import epsilon_lb_clopper_pearson, epsilon_lb_gdp
from attacks.scores import confusion_counts, validate_scores

# Non-members needed before TPR at that FPR means anything: 10 / FPR (Carlini et al. 2022).
LOW_FPR_MIN_NONMEMBERS = {"tpr_at_1pct_fpr": 1_000, "tpr_at_01pct_fpr": 10_000}

# Bootstrap replicates are drawn in chunks of at most this many scores, to bound memory.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def _encode_float(x: float | np.floating) -> float | str:
    # Strict JSON has no inf/NaN; spell them out so files load in any JSON reader.
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _decode_float(x: float | str) -> float:
    return float(x)  # float("inf"), float("-inf") and float("nan") parse the spelled-out forms


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _to_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _encode_float(obj)
    return obj


@dataclasses.dataclass(frozen=True)
class RocCurve:
    """Exact ROC of the rule "member if score >= threshold"; each field has shape (T + 1,).

    Stored as tuples so the record is immutable and hashable; thresholds[0] is +inf (the (0, 0) point).
    """

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("fpr", "tpr", "thresholds"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if not len(self.fpr) == len(self.tpr) == len(self.thresholds):
            raise ValueError("fpr, tpr and thresholds must have the same length")

    def to_dict(self) -> dict[str, Any]:
        return _to_json(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RocCurve:
        return cls(**{k: tuple(_decode_float(x) for x in d[k]) for k in ("fpr", "tpr", "thresholds")})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> RocCurve:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """Everything one attack yields on one member/non-member split.

    `auc_ci` is a percentile bootstrap interval; the two epsilon fields are lower bounds that hold
    with probability `extra["confidence"]` (see `attacks.empirical_epsilon`). `extra` must hold
    JSON-native values (str, int, float, bool, None, lists, dicts) to round-trip through `save`.
    """

    name: str
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    advantage: float
    num_members: int
    num_nonmembers: int
    low_fpr_reliable: dict[str, bool]
    epsilon_lb_clopper_pearson: float
    epsilon_lb_gdp: float
    roc: RocCurve
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "roc"}
        return {**_to_json(d), "roc": self.roc.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttackResult:
        floats = ("auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "advantage",
                  "epsilon_lb_clopper_pearson", "epsilon_lb_gdp")
        return cls(
            name=d["name"],
            auc_ci=(_decode_float(d["auc_ci"][0]), _decode_float(d["auc_ci"][1])),
            num_members=int(d["num_members"]),
            num_nonmembers=int(d["num_nonmembers"]),
            low_fpr_reliable={k: bool(v) for k, v in d["low_fpr_reliable"].items()},
            roc=RocCurve.from_dict(d["roc"]),
            extra=dict(d.get("extra", {})),
            **{k: _decode_float(d[k]) for k in floats},
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> AttackResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def roc_curve(scores: Any, is_member: Any) -> RocCurve:
    """Exact ROC at every distinct score, like sklearn's roc_curve(drop_intermediate=False)."""
    thresholds, tp, fp = confusion_counts(scores, is_member)
    return RocCurve(fpr=tuple(fp / fp[-1]), tpr=tuple(tp / tp[-1]), thresholds=tuple(thresholds))


def batched_auc(scores: np.ndarray, is_member: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` (B, N) against shared labels `is_member` (N,); returns (B,).

    Mann-Whitney: AUC = (R_+ - n_+(n_+ + 1)/2) / (n_+ n_-), with R_+ the members' rank sum under
    mid-ranks, which counts a tied member/non-member pair as 1/2, exactly like the trapezoidal ROC.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be 2-D (B, N) with B >= 1, got shape {scores.shape}")
    _, m = validate_scores(scores[0], is_member)
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN/inf values")
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    rank_sum = rankdata(scores, axis=1)[:, m].sum(axis=1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc(scores: Any, is_member: Any) -> float:
    """Area under the ROC curve (rank-based; equals sklearn's roc_auc_score, ties included)."""
    s, m = validate_scores(scores, is_member)
    return float(batched_auc(s[None, :], m)[0])


def tpr_at_fpr(curve: RocCurve, fpr: float) -> float:
    """Largest TPR among the ROC points with FPR <= `fpr` (LiRA's convention, no interpolation)."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t = np.asarray(curve.fpr), np.asarray(curve.tpr)
    # The (0, 0) point is always on the curve, so the selection is never empty.
    return float(t[f <= fpr].max())


def advantage(curve: RocCurve) -> float:
    """Attacker advantage max_t (TPR - FPR) (Yeom et al. 2018); 0 for an attack that guesses."""
    return float(np.max(np.asarray(curve.tpr) - np.asarray(curve.fpr)))


def bootstrap_ci(
    scores: Any,
    is_member: Any,
    statistic: Callable[..., Any],
    n: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic`, resampling members and non-members separately.

    Stratified so that every replicate keeps the class sizes: AUC and TPR at FPR are defined
    conditionally on them. Each replicate lays out its members first, so the labels are one shared
    (N,) array. With `vectorized=False`, `statistic(scores (N,), is_member (N,)) -> float` is called
    once per replicate; with `vectorized=True`, `statistic(scores (B, N), is_member (N,)) -> (B,)`
    is called on chunks of replicates (e.g. `batched_auc`).
    """
    s, m = validate_scores(scores, is_member)
    if n < 1:
        raise ValueError(f"need at least one bootstrap replicate, got n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    members, nonmembers = s[m], s[~m]
    labels = np.r_[np.ones(members.size, bool), np.zeros(nonmembers.size, bool)]
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // s.size)
    values = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        rows = np.concatenate(
            [members[rng.integers(0, members.size, (b, members.size))],
             nonmembers[rng.integers(0, nonmembers.size, (b, nonmembers.size))]],
            axis=1,
        )
        if vectorized:
            out = np.asarray(statistic(rows, labels), dtype=np.float64)
            if out.shape != (b,):
                raise ValueError(f"vectorized statistic returned shape {out.shape}, expected ({b},)")
        else:
            out = np.array([float(statistic(row, labels)) for row in rows])
        values.append(out)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def evaluate_scores(
    name: str,
    scores: Any,
    is_member: Any,
    delta: float,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> AttackResult:
    """Score one attack: ROC, AUC with bootstrap CI, TPR at 1% / 0.1% FPR, advantage, epsilon LBs.

    The epsilon lower bounds use the Bonferroni-corrected threshold search (valid at `confidence`);
    `delta` must be in (0, 1) because the GDP conversion needs it.
    """
    s, m = validate_scores(scores, is_member)
    curve = roc_curve(s, m)
    n_neg = int((~m).sum())
    cp = epsilon_lb_clopper_pearson(s, m, delta, confidence, threshold_correction="bonferroni")
    gdp = epsilon_lb_gdp(s, m, delta, confidence, threshold_correction="bonferroni")
    return AttackResult(
        name=name,
        auc=auc(s, m),
        auc_ci=bootstrap_ci(s, m, batched_auc, n=bootstrap, confidence=confidence, seed=seed,
                            vectorized=True),
        tpr_at_1pct_fpr=tpr_at_fpr(curve, 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(curve, 0.001),
        advantage=advantage(curve),
        num_members=int(m.sum()),
        num_nonmembers=n_neg,
        low_fpr_reliable={k: n_neg >= v for k, v in LOW_FPR_MIN_NONMEMBERS.items()},
        epsilon_lb_clopper_pearson=cp.epsilon,
        epsilon_lb_gdp=gdp.epsilon,
        roc=curve,
        extra={
            "delta": float(delta),
            "confidence": float(confidence),
            "threshold_correction": "bonferroni",
            "clopper_pearson_threshold": _finite_or_none(cp.threshold),
            "gdp_mu": _finite_or_none(gdp.mu),
            "gdp_threshold": _finite_or_none(gdp.threshold),
            "bootstrap": int(bootstrap),
            "seed": int(seed),
        },
    )
