"""The feature encoder: distances it gives between real images against distances to degraded and
wrong-anatomy images, its cache, and the Inception path's error without the extra."""

import importlib.util

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fedgen.data.synthetic import generate_xrays
from fedgen.evaluation import features
from fedgen.evaluation.features import (
    EncoderSettings,
    encoder_fingerprint,
    load_encoder,
    load_or_train_encoder,
)
from fedgen.evaluation.fidelity import frechet_distance

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xrays():
    """300 training images and 300 unseen ones (different patients), 3 sources, 32x32."""
    data = generate_xrays(
        num_patients=600,
        images_per_patient=1,
        image_size=32,
        num_sources=3,
        finding_rate=0.3,
        seed=0,
    )
    return data.subset(np.arange(300)), data.subset(np.arange(300, 600))


@pytest.fixture(scope="module")
def encoder(xrays, tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    return load_or_train_encoder(path, xrays[0], log=lambda _: None)


def test_real_halves_are_much_closer_than_degraded_or_misplaced_images(encoder, xrays):
    unseen = xrays[1].images
    a, b = unseen[:150], unseen[150:]
    noisy = (b + 0.3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(
        -1, 1
    )
    blurred = torch.from_numpy(gaussian_filter(b.numpy(), sigma=(0, 0, 1.0, 1.0), mode="nearest"))
    f_a = encoder.features(a)
    floor = frechet_distance(f_a, encoder.features(b))
    assert frechet_distance(f_a, encoder.features(noisy)) > 5 * floor
    assert frechet_distance(f_a, encoder.features(blurred)) > 3 * floor
    # Anatomy, which no head was trained on: the heart on the wrong side.
    assert frechet_distance(f_a, encoder.features(b.flip(-1))) > 5 * floor
    # Images the encoder was trained on are not special to it (it did not memorise them).
    assert frechet_distance(f_a, encoder.features(xrays[0].images[:150])) < 2 * floor


def test_the_source_head_reads_each_hospitals_style_and_a_skewed_mix_is_far(encoder, xrays):
    unseen = xrays[1]
    sources = np.asarray(unseen.sources)
    assert encoder.sources == tuple(sorted(set(sources)))
    shares = encoder.source_shares(unseen.images)
    assert sum(shares.values()) == pytest.approx(1.0)
    for name in encoder.sources:
        assert shares[name] == pytest.approx(np.mean(sources == name), abs=0.1)
        assert encoder.source_shares(unseen.images[torch.from_numpy(sources == name)])[name] > 0.8
    # Good images in the wrong proportions: most of one source's, few of the others'.
    first = np.flatnonzero(sources == encoder.sources[0])
    rest = np.random.default_rng(0).permutation(np.flatnonzero(sources != encoder.sources[0]))
    a = unseen.images[torch.from_numpy(np.concatenate([first[::2], rest[::2]]))]
    balanced = unseen.images[torch.from_numpy(np.concatenate([first[1::2], rest[1::2]]))]
    skewed = unseen.images[torch.from_numpy(np.concatenate([first[1::2], rest[1::2][: len(first) // 8]]))]
    f_a = encoder.features(a)
    assert frechet_distance(f_a, encoder.features(skewed)) > 3 * frechet_distance(f_a, encoder.features(balanced))


def test_features_shape_and_determinism(encoder, xrays):
    f = encoder.features(xrays[1].images[:10])
    assert f.shape == (10, EncoderSettings().feature_dim) and f.dtype == np.float64
    np.testing.assert_allclose(f, encoder.features(xrays[1].images[:10], batch_size=3), atol=1e-5)
    with pytest.raises(ValueError, match="32x32"):
        encoder.features(torch.zeros(2, 1, 16, 16))


def test_cache_is_loaded_and_a_different_fingerprint_is_refused(tmp_path, monkeypatch):
    data = generate_xrays(
        num_patients=40,
        images_per_patient=1,
        image_size=16,
        num_sources=2,
        finding_rate=0.5,
        seed=1,
    )
    settings = EncoderSettings(epochs=1)
    path = tmp_path / "enc.pt"
    first = load_or_train_encoder(path, data, settings, log=lambda _: None)
    assert path.exists() and first.fingerprint == encoder_fingerprint(data, settings)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached encoder should have been loaded")

    monkeypatch.setattr(features, "train_encoder", no_training)
    second = load_or_train_encoder(path, data, settings, log=lambda _: None)
    assert second.kind == "trained" and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(first.features(data.images), second.features(data.images))

    other = data.subset(np.arange(20))
    with pytest.raises(ValueError, match="fingerprint"):
        load_or_train_encoder(path, other, settings, log=lambda _: None)
    assert encoder_fingerprint(data, EncoderSettings(epochs=2)) != first.fingerprint


@pytest.mark.skipif(
    importlib.util.find_spec("pytorch_fid") is not None, reason="pytorch-fid is installed"
)
def test_inception_weights_without_the_extra_name_it(tmp_path):
    path = tmp_path / "pt_inception.pth"
    torch.save({"Mixed_7c.branch1x1.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ImportError, match=r"fedgen\[inception\]"):
        load_encoder(path)


def test_unknown_files_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a fedgen encoder"):
        load_encoder(path)
