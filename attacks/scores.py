"""Scores against membership labels: the one input check and the counts at every threshold that
`metrics` (ROC, AUC, TPR at low FPR) and `empirical_epsilon` (lower bounds on epsilon) build on.

Convention (see `metrics`): `scores` is a 1-D float array of shape (N,), higher = more likely a
member; `is_member` is a bool (or 0/1) array of shape (N,).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedgen.audit_bounds import validate_scores  # the one input check, shared with fedgen's audits


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


def log_error(s: np.ndarray) -> np.ndarray:
    """-log(-s) when every s < 0 (a negated error: minus the log of the error), else s itself.
    Monotone in s, so higher = member still; errors are positive and skewed, and their log is
    what the reference-model attacks fit Gaussians and lines to."""
    return -np.log(-s) if (s < 0).all() else s
