"""Scores against membership labels: the one input check and the counts at every threshold that
`metrics` (ROC, AUC, TPR at low FPR) and `empirical_epsilon` (lower bounds on epsilon) build on.

Convention (see `metrics`): `scores` is a 1-D float array of shape (N,), higher = more likely a
member; `is_member` is a bool (or 0/1) array of shape (N,).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def validate_scores(
    scores: Any, is_member: Any, *, require_both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 (N,), is_member bool (N,)), or raise ValueError on bad input."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if m.shape != s.shape:
        raise ValueError(f"scores and labels differ in shape: {s.shape} vs {m.shape}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if m.dtype != np.bool_:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("membership labels must be boolean or 0/1")
        m = m.astype(bool)
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"scores contain {bad.size} NaN/inf values (first at index {bad[0]})")
    n_pos = int(m.sum())
    if require_both_classes and n_pos in (0, m.size):
        raise ValueError(
            f"need both members and non-members, got {n_pos} members of {m.size} scores"
        )
    return s, m


def confusion_counts(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts for the rule "member if score >= t", at every distinct score t (descending).

    Returns (thresholds, tp, fp), each of shape (T + 1,) with T distinct scores; the first entry is
    t = +inf (nobody flagged), the last flags everybody, so tp[-1] = #members, fp[-1] = #non-members.
    Same points as sklearn.metrics.roc_curve(drop_intermediate=False).
    """
    s, m = validate_scores(scores, is_member)
    order = np.argsort(-s, kind="stable")
    s_sorted, m_sorted = s[order], m[order]
    # The last index of each run of equal scores: tied scores cross the threshold together.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    tp = np.cumsum(m_sorted)[ends]
    fp = ends + 1 - tp
    return np.r_[np.inf, s_sorted[ends]], np.r_[0, tp], np.r_[0, fp]
