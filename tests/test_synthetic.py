"""The synthetic chest X-rays: determinism, patient structure, findings, silos, anatomy."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import f_oneway

from fedgen.data.dataset import DataError
from fedgen.data.images import save_grid
from fedgen.data.synthetic import acquisition_profile, generate_xrays

SIZE = 32


@pytest.fixture(scope="module")
def xrays():
    return generate_xrays(
        num_patients=90, images_per_patient=3, image_size=SIZE, num_sources=3,
        finding_rate=0.3, seed=0,
    )  # fmt: skip


def region_mean(images: torch.Tensor, x: float, y: float, half: float) -> float:
    """Mean brightness in [0, 1] of a square around normalised (x right, y down) coordinates."""

    def pixel(v: float) -> int:
        return int(round((v + 1) / 2 * images.shape[-1]))

    box = images[..., pixel(y - half) : pixel(y + half), pixel(x - half) : pixel(x + half)]
    return float((box.mean() + 1) / 2)


def test_same_seed_same_bytes_and_other_seed_differs():
    a = generate_xrays(6, 2, SIZE, 2, 0.5, seed=3)
    b = generate_xrays(6, 2, SIZE, 2, 0.5, seed=3)
    c = generate_xrays(6, 2, SIZE, 2, 0.5, seed=4)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert np.array_equal(a.labels, b.labels)
    assert (a.images - c.images).abs().mean() > 0.05


def test_a_patient_does_not_depend_on_how_many_others_are_generated():
    few = generate_xrays(4, 2, SIZE, 2, 0.5, seed=1)
    many = generate_xrays(10, 2, SIZE, 2, 0.5, seed=1)
    assert torch.equal(few.images, many.images[:8])
    assert list(few.patient_ids) == list(many.patient_ids[:8])


def test_shapes_range_ids_and_sources(xrays):
    assert xrays.images.shape == (270, 1, SIZE, SIZE)
    assert xrays.images.dtype == torch.float32
    assert xrays.images.min() >= -1.0 and xrays.images.max() <= 1.0
    assert xrays.images.max() - xrays.images.min() > 1.5  # uses the range: black air, white bone
    ids, counts = np.unique(xrays.patient_ids, return_counts=True)
    assert len(ids) == 90 and set(counts) == {3}
    assert list(xrays.patient_ids[:4]) == ["s0-p00000"] * 3 + ["s1-p00001"]
    assert list(xrays.sources[:4]) == ["synthetic-0"] * 3 + ["synthetic-1"]
    assert xrays.patient_ids[-1] == "s2-p00089" and xrays.sources[-1] == "synthetic-2"


@pytest.mark.parametrize("size", [64, 128])
def test_larger_sizes(size):
    data = generate_xrays(2, 1, size, 1, 0.0, seed=0)
    assert data.images.shape == (2, 1, size, size)
    assert region_mean(data.images, -0.45, -0.1, 0.1) < region_mean(data.images, 0.0, -0.35, 0.04)


def test_images_of_a_patient_are_more_alike_than_images_of_different_patients(xrays):
    flat = xrays.images.flatten(1)
    distance = torch.cdist(flat, flat)
    same_source = torch.from_numpy(xrays.sources[:, None] == xrays.sources[None, :])
    same_patient = torch.from_numpy(xrays.patient_ids[:, None] == xrays.patient_ids[None, :])
    distance[~same_source] = float("inf")  # compare within a silo, where the style is shared
    distance.fill_diagonal_(float("inf"))
    nearest = distance.argmin(dim=1)
    hit_rate = same_patient[torch.arange(len(xrays)), nearest].float().mean()
    assert hit_rate > 0.9
    same = same_patient & same_source & ~torch.eye(len(xrays), dtype=torch.bool)
    other = ~same_patient & same_source
    assert distance[same].mean() < 0.7 * distance[other].mean()


def test_labels_follow_the_finding_rate_per_patient(xrays):
    assert set(np.unique(xrays.labels)) == {0, 1}
    for pid in np.unique(xrays.patient_ids):
        assert len(set(xrays.labels[xrays.patient_ids == pid])) == 1  # a nodule persists
    rate = xrays.labels[::3].mean()
    assert abs(rate - 0.3) < 0.15  # 90 patients: 3 standard deviations is 0.145
    assert generate_xrays(8, 1, SIZE, 2, 0.0, seed=0).labels.sum() == 0
    assert generate_xrays(8, 1, SIZE, 2, 1.0, seed=0).labels.min() == 1


def test_the_nodule_is_a_small_bright_spot_inside_a_lung():
    healthy = generate_xrays(12, 1, SIZE, 2, 0.0, seed=2)
    sick = generate_xrays(12, 1, SIZE, 2, 1.0, seed=2)  # same patients, now with nodules
    diff = sick.images - healthy.images
    assert diff.min() > -1e-6  # only adds density
    spot = diff > 0.02
    assert (spot.flatten(1).sum(1) > 0).all()
    assert (spot.flatten(1).sum(1) < 40).all()  # small: well under 4% of the image
    # Where it sits, the healthy image is lung: darker than the image's median.
    medians = healthy.images.flatten(1).median(dim=1).values
    at_nodule = torch.stack([healthy.images[i][spot[i]].mean() for i in range(len(diff))])
    assert (at_nodule < medians).all()


def test_sources_differ_in_profile_and_in_measured_statistics(xrays):
    profiles = [acquisition_profile(s, seed=0) for s in range(3)]
    for field in ("gamma", "noise_std", "zoom", "brightness"):
        values = [getattr(p, field) for p in profiles]
        assert len(set(values)) == 3, field
    assert acquisition_profile(1, seed=0) == acquisition_profile(1, seed=0)
    assert acquisition_profile(1, seed=0) != acquisition_profile(1, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profiles[0].gamma = 1.0  # type: ignore[misc]

    groups = [xrays.images[xrays.sources == f"synthetic-{s}"] for s in range(3)]
    means = [g.flatten(1).mean(1).numpy() for g in groups]
    # Noise: what a pixel has that the mean of its 4 neighbours does not.
    noise = [
        (g[..., 1:-1, 1:-1] - (g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2]
                               + g[..., 1:-1, 2:]) / 4).flatten(1).std(1).numpy()
        for g in groups
    ]  # fmt: skip
    assert f_oneway(*means).pvalue < 1e-6
    assert f_oneway(*noise).pvalue < 1e-6
    noisiest = int(np.argmax([p.noise_std for p in profiles]))
    assert int(np.argmax([n.mean() for n in noise])) == noisiest


@pytest.mark.parametrize(
    "argument, value",
    [
        ("num_patients", 0),
        ("images_per_patient", 0),
        ("image_size", 8),
        ("num_sources", 0),
        ("finding_rate", 1.5),
        ("finding_rate", -0.1),
        ("seed", -1),
    ],
)
def test_bad_argument_raises_data_error_naming_it(argument, value):
    kwargs = dict(
        num_patients=2, images_per_patient=1, image_size=SIZE, num_sources=1,
        finding_rate=0.5, seed=0,
    )  # fmt: skip
    kwargs[argument] = value
    with pytest.raises(DataError, match=argument):
        generate_xrays(**kwargs)


def test_anatomy_lungs_dark_spine_and_heart_bright_heart_on_image_right(xrays):
    images = xrays.images
    right_lung = region_mean(images, -0.45, -0.1, 0.1)  # patient's right = image left
    left_lung = region_mean(images, 0.45, -0.1, 0.1)
    spine = region_mean(images, 0.0, -0.35, 0.05)
    heart = region_mean(images, 0.25, 0.2, 0.1)
    heart_mirror = region_mean(images, -0.25, 0.2, 0.1)
    abdomen = region_mean(images, 0.0, 0.85, 0.1)
    outside = region_mean(images, -0.95, 0.85, 0.04)
    for lung in (right_lung, left_lung):
        assert lung < spine - 0.2
        assert lung < heart - 0.2
        assert lung < abdomen - 0.2
        assert outside < lung
    assert heart > heart_mirror + 0.1


def test_save_grid_writes_the_pixels_back(tmp_path):
    images = generate_xrays(5, 1, SIZE, 1, 0.0, seed=0).images
    path = save_grid(images, tmp_path / "grid.png", nrow=3, padding=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)
    first = ((images[0, 0] + 1) * 127.5).round().numpy()
    assert np.array_equal(grid[2 : 2 + SIZE, 2 : 2 + SIZE], first)
    assert grid[-SIZE - 2 :, -SIZE - 2 :].max() == 0  # the sixth cell is empty padding
