"""Dataset inference: one p-value for "this set of images was used in training".

Aggregates per-image membership scores of a suspect set (say, one hospital's 50-100 images)
into a hypothesis test against images known not to be in training (Dubinski et al., CVPR 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats


def _welch(suspect: np.ndarray, reference: np.ndarray) -> float:
    return float(stats.ttest_ind(suspect, reference, equal_var=False, alternative="greater").pvalue)


def _mann_whitney(suspect: np.ndarray, reference: np.ndarray) -> float:
    return float(stats.mannwhitneyu(suspect, reference, alternative="greater").pvalue)


DATASET_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "welch": _welch,
    "mannwhitney": _mann_whitney,
}


def dataset_inference(
    suspect_scores: Any, reference_nonmember_scores: Any, test: str = "welch"
) -> float:
    """p-value of "the suspect set was in the training data" from per-image membership scores.

    Dataset inference (Dubinski et al., CVPR 2025; after Maini et al., NeurIPS 2024 for LLMs): one
    image is weak evidence, but a hospital's 50-100 images together are strong. H0: the suspect
    images' scores come from the same distribution as those of images known not to be in training;
    H1 (one-sided): suspects score higher. Small p = evidence the set was used.

    - "welch" (default; the t-test of Maini et al., which Dubinski et al. adopt): Welch's
      unequal-variance t-test on the means; needs roughly normal means (the central limit
      theorem, with a few tens of images per side).
    - "mannwhitney": Mann-Whitney U, rank-based, no normality, tests stochastic dominance.

    Both assume (1) the reference images are drawn from the same distribution as the suspect set
    would be if unused: the same hospital, scanner and population, never seen in training. Scores
    from a different source shift for reasons other than membership, and the test then detects the
    shift, not training; (2) scores are independent across images: several films of one patient
    are not independent evidence; (3) the scores, attack and its settings were fixed before looking
    at these images (no tuning on them). Scores: 1-D arrays, higher = more likely a member.
    """
    if test not in DATASET_TESTS:
        raise KeyError(f"unknown dataset test '{test}'; registered: {sorted(DATASET_TESTS)}")
    suspect = np.asarray(suspect_scores, dtype=np.float64)
    reference = np.asarray(reference_nonmember_scores, dtype=np.float64)
    for label, s in (("suspect_scores", suspect), ("reference_nonmember_scores", reference)):
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"{label} must be 1-D with at least 2 scores, got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{label} contain NaN/inf")
    return DATASET_TESTS[test](suspect, reference)
