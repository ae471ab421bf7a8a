"""Pooled membership scores are calibrated per hospital before one threshold is applied."""

import numpy as np
import pytest

from attacks.audit import calibrate_per_hospital
from attacks.metrics import auc


def test_calibration_recovers_what_each_hospital_separates():
    rng = np.random.default_rng(0)
    n = 200
    hospital = np.repeat([0, 1], n)
    is_member = np.tile(np.repeat([True, False], n // 2), 2)
    # Each hospital separates its members perfectly, but hospital 1's scores sit 10 higher:
    # its non-members outscore hospital 0's members.
    scores = np.where(is_member, 1.0, 0.0) + rng.uniform(0, 0.5, 2 * n) + 10.0 * hospital
    assert auc(scores, is_member) == pytest.approx(0.75)  # hospital 0's members lose to 1's non-members
    assert auc(calibrate_per_hospital(scores, hospital), is_member) == 1.0


def test_calibration_uses_no_labels_and_keeps_each_hospitals_order():
    rng = np.random.default_rng(1)
    scores, hospital = rng.normal(size=90), np.repeat([0, 1, 2], 30)
    calibrated = calibrate_per_hospital(scores, hospital)
    for h in range(3):
        mine = hospital == h
        assert np.array_equal(np.argsort(calibrated[mine]), np.argsort(scores[mine]))
        assert np.median(calibrated[mine]) == pytest.approx(0.0, abs=1e-12)
    constant = calibrate_per_hospital(np.ones(10), np.zeros(10, dtype=int))
    assert np.all(np.isfinite(constant))
