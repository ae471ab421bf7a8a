"""The downstream check on a task whose answer is known: a bright blob (label 1) or none."""

import numpy as np
import pytest
import torch

from fedgen.data.dataset import ImageSet
from fedgen.evaluation.downstream import (
    ClassifierSettings,
    downstream_check,
    has_binary_labels,
    load_or_train_labeller,
    predict,
)

SETTINGS = ClassifierSettings(width=8, epochs=15)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(n: int, seed: int, positive_rate: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
    """Noisy 16x16 images [n,1,16,16]; label 1 ones carry a bright Gaussian blob somewhere."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_rate).astype(np.int64)
    yy, xx = np.mgrid[:16, :16]
    images = -0.5 + 0.15 * rng.standard_normal((n, 16, 16))
    for i in np.flatnonzero(labels):
        cy, cx = rng.uniform(3, 13, size=2)
        images[i] += 1.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
    return torch.from_numpy(images.clip(-1, 1)).float().unsqueeze(1), labels


def test_faithful_samples_match_the_baseline_and_samples_without_the_finding_do_not():
    train_x, train_y = _blobs(200, seed=0)
    test_x, test_y = _blobs(200, seed=1)
    faithful, _ = _blobs(200, seed=2)  # a generator that samples the real distribution
    good = downstream_check(train_x, train_y, test_x, test_y, faithful, SETTINGS)
    assert good.baseline_auc > 0.95
    assert good.auc > 0.9
    assert good.pseudo_positive_rate == pytest.approx(0.5, abs=0.15)
    assert (good.num_generated, good.num_train, good.num_test) == (200, 200, 200)

    no_finding, _ = _blobs(200, seed=3, positive_rate=0.0)  # a generator that dropped the finding
    bad = downstream_check(train_x, train_y, test_x, test_y, no_finding, SETTINGS)
    assert bad.baseline_auc == good.baseline_auc  # same labeller, same settings: deterministic
    assert bad.pseudo_positive_rate == 0.0  # every sample labelled 0: nothing to learn
    assert (bad.auc, bad.accuracy) == (0.5, 0.5)  # the constant classifier


def test_labels_must_be_binary_with_both_classes():
    assert has_binary_labels(np.array([0, 1, 1]))
    assert not has_binary_labels(np.array([0, 0]))
    assert not has_binary_labels(np.array([-1, 0, 1]))
    assert not has_binary_labels(np.array([], dtype=np.int64))
    x, y = _blobs(10, seed=0)
    with pytest.raises(ValueError, match="test_labels"):
        downstream_check(x, y, x, np.zeros(10, dtype=np.int64), x, SETTINGS)


def test_the_labeller_is_cached_and_a_foreign_cache_is_refused(tmp_path):
    x, y = _blobs(120, seed=0)
    training = ImageSet(x, np.arange(120).astype(str), y, np.full(120, "a"))
    path = tmp_path / "labeller.pt"
    logs: list[str] = []
    trained = load_or_train_labeller(path, training, SETTINGS, log=logs.append)
    loaded = load_or_train_labeller(path, training, SETTINGS, log=logs.append)
    assert len(logs) == 1 and path.exists()  # trained once, then loaded
    np.testing.assert_allclose(predict(loaded, x), predict(trained, x), rtol=1e-6)
    test_x, test_y = _blobs(100, seed=1)
    fresh = downstream_check(x, y, test_x, test_y, test_x, SETTINGS)
    cached = downstream_check(x, y, test_x, test_y, test_x, SETTINGS, labeller=loaded)
    assert cached.baseline_auc == pytest.approx(fresh.baseline_auc)
    other = ImageSet(x, training.patient_ids, 1 - y, training.sources)  # other labels
    with pytest.raises(ValueError, match="not the finding labeller"):
        load_or_train_labeller(path, other, SETTINGS)
