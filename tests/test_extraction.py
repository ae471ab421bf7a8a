"""Extraction criteria: a near-copy of a training image is flagged, a novel image is not."""

import torch

from attacks.extraction import ExtractionConfig, find_copies, generate, pairs_grid, unique_images


def _training(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=g) * 2 - 1


def test_near_copies_are_flagged_and_novel_images_are_not():
    training = _training()
    g = torch.Generator().manual_seed(1)
    copies = training[[3, 17]] + 0.01 * torch.randn((2, 1, 8, 8), generator=g)
    novel = torch.rand((5, 1, 8, 8), generator=g) * 2 - 1
    result = find_copies(torch.cat([copies, novel]), training, ExtractionConfig())
    assert result.flagged_ratio == [0, 1] and result.flagged_normalised == [0, 1]
    assert result.nearest[:2] == [3, 17]
    pairs = pairs_grid(torch.cat([copies, novel]), training, result)
    assert pairs.shape == (4, 1, 8, 8) and torch.equal(pairs[1], training[3])


def test_duplicates_count_once():
    training = _training(10)
    doubled = torch.cat([training, training[:4]])
    assert len(unique_images(doubled)) == 10
    # With a duplicate left in, a copy of it would fail the ratio test (NN1 = NN2).
    copy = training[:1]
    assert find_copies(copy, doubled, ExtractionConfig()).flagged_ratio == []
    assert find_copies(copy, unique_images(doubled), ExtractionConfig()).flagged_ratio == [0]


def test_generate_batches_and_is_seeded():
    cfg = ExtractionConfig(num_samples=10, batch_size=4, seed=3)
    calls = []

    def sample_fn(noise, generator):
        calls.append(len(noise))
        return (noise + torch.randn(noise.shape, generator=generator)).clamp(-1, 1)  # a sampler's own noise

    a = generate(sample_fn, (1, 4, 4), cfg, progress=False)
    b = generate(sample_fn, (1, 4, 4), cfg, progress=False)
    assert calls == [4, 4, 2, 4, 4, 2] and a.shape == (10, 1, 4, 4) and torch.equal(a, b)


def test_nearer_than_heldout_finds_what_the_ratio_misses_and_counts_chance_as_chance():
    """Images of one anatomy sit near one another, so the ratio test never fires on them; the
    calibrated criterion compares a sample's nearest training image with held-out images' own."""
    g = torch.Generator().manual_seed(0)
    mean = torch.rand((1, 1, 8, 8), generator=g) * 2 - 1
    draw = lambda n: mean + 0.3 * torch.randn((n, 1, 8, 8), generator=g)  # noqa: E731
    training, heldout = draw(64), draw(400)
    # Halfway from a fresh image to a training image: not a copy by the ratio test, yet nearer
    # to the training set than held-out images are.
    drifted = 0.5 * (draw(20) + training[:20])
    cfg = ExtractionConfig(calibration_quantile=0.01)
    memorising = find_copies(torch.cat([drifted, draw(80)]), training, cfg, heldout)
    assert memorising.flagged_ratio == [] and memorising.flagged_normalised == []
    assert len(memorising.flagged_nearer_than_heldout) >= 15 and memorising.p_value < 1e-6
    assert memorising.expected_by_chance == 1.0
    fresh = find_copies(draw(100), training, cfg, heldout)
    assert len(fresh.flagged_nearer_than_heldout) <= 5 and fresh.p_value > 0.01
    assert find_copies(draw(5), training, cfg).p_value is None  # no held-out images: not computed


def test_copies_are_split_by_the_duplication_of_the_image_they_sit_nearest():
    from attacks.extraction import by_duplication, multiplicity
    from fedgen.data.dataset import content_hashes

    g = torch.Generator().manual_seed(0)
    mean = torch.rand((1, 1, 8, 8), generator=g) * 2 - 1
    draw = lambda n: (mean + 0.3 * torch.randn((n, 1, 8, 8), generator=g)).clamp(-1, 1)  # noqa: E731
    training, heldout = draw(40), draw(400)
    duplicated = {h: 3 for h in content_hashes(training[:4])}  # 4 of 40 images, 3 extra copies each
    copies = multiplicity(training, duplicated)
    assert copies == [4] * 4 + [1] * 36
    # A model that copies its duplicated images: 12 near-copies of images 0-2, and fresh images.
    samples = torch.cat([training[[0, 1, 2] * 4] + 0.01 * torch.randn((12, 1, 8, 8), generator=g), draw(88)])
    result = find_copies(samples, training, ExtractionConfig(), heldout)
    split = by_duplication(result, copies)
    assert split["training_images"] == 40 and split["duplicated_images"] == 4 and split["copies_of_duplicated"] == 4
    assert split["nearer_than_heldout_duplicated"] >= 12 and split["distinct_duplicated_images_copied"] == 3
    assert split["nearer_than_heldout"] == len(result.flagged_nearer_than_heldout)
    assert split["nearer_than_heldout"] - split["nearer_than_heldout_duplicated"] <= 4  # fresh ones: chance
