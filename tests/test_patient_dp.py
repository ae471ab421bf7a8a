"""Patient-level DP (`privacy.unit=patient`): patients are Poisson-sampled whole, a patient's images
are clipped as one, and the plan, delta check and privacy card count patients."""

import dataclasses

import pytest
import torch

import fedgen.privacy.dp_sgd as dp_sgd
from fedgen.config import load_config
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, make_plan
from fedgen.privacy.dp_optimizer import NoisingDPOptimizer
from fedgen.privacy.dp_sgd import (
    group_chunks,
    noisy_step,
    privacy_units,
    train_locally,
    units_to_images,
)
from fedgen.privacy.randomness import privacy_randomness


def _grad_norm(unet) -> float:
    return float(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]).norm())


@pytest.mark.parametrize("grouped", [False, True])
def test_a_patients_identical_images_are_clipped_as_one(base_config, grouped):
    torch.manual_seed(0)
    unet = build_unet(base_config.model, 16)
    diffusion = Diffusion(build_scheduler(base_config.model))
    clip = 1e-3  # every row is clipped to exactly this norm
    optimizer = NoisingDPOptimizer(torch.optim.SGD(unet.parameters(), lr=1.0), noise_multiplier=0.0,
                                   max_grad_norm=clip, expected_batch_size=1, loss_reduction="mean",
                                   randomness=privacy_randomness(False))
    x0 = (torch.rand(1, 1, 16, 16) * 2 - 1).repeat(3, 1, 1, 1)  # one patient, three identical films
    t, eps = torch.full((3, 1), 500), torch.randn(1, 1, 1, 16, 16).repeat(3, 1, 1, 1, 1)  # the same draw
    group_of = torch.zeros(3, dtype=torch.long) if grouped else None
    noisy_step(optimizer, unet, diffusion, x0, t, eps, group_of=group_of)
    expected = clip if grouped else 3 * clip  # example-level: three rows of norm C, all aligned
    assert _grad_norm(unet) == pytest.approx(expected, rel=1e-4)


def test_chunks_never_split_a_patient():
    group_of = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 4])
    slices = group_chunks(group_of, size=4)
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 6), (6, 11), (11, 12)]
    for s in slices[1:]:
        assert group_of[s.start] != group_of[s.start - 1]


def test_sampling_is_by_patient_and_the_plan_counts_patients(base_config, monkeypatch):
    cfg = dataclasses.replace(base_config, privacy=dataclasses.replace(base_config.privacy, unit="patient"),
                              training=dataclasses.replace(base_config.training, max_physical_batch_size=2))
    patients = [f"p{i}" for i in (0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5)]
    groups = privacy_units(patients, "patient")
    assert groups.tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    assert privacy_units(patients, "example") is None
    assert [m.tolist() for m in units_to_images(groups, 6)] == [[0, 1, 2], [3], [4, 5], [6], [7, 8, 9, 10], [11]]
    images = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 16, 16) / 100
    plan = make_plan(6, batch_size=3, local_epochs=2, num_rounds=1)  # q = 3 / 6 patients
    seen = []

    def spy(optimizer, unet, diffusion, x0, t, eps, size=0, group_of=None, subspace=None):
        ids = (x0[:, 0, 0, 0] * 100).round().long()
        seen.append([sorted(ids[group_of == g].tolist()) for g in group_of.unique()] if len(x0) else [])
        return x0.new_zeros(len(x0))

    monkeypatch.setattr(dp_sgd, "noisy_step", spy)
    ledger = EpsilonLedger.start(cfg.privacy, plan)
    unet = build_unet(cfg.model, 16)
    train_locally(unet, Diffusion(build_scheduler(cfg.model)), images, cfg, plan, ledger, (0, 0, 1), groups=groups)
    whole = {tuple(m.tolist()) for m in units_to_images(groups, 6)}
    assert len(seen) == plan.steps_per_round
    assert all(tuple(members) in whole for batch in seen for members in batch)  # whole patients only
    assert ledger.sample_rate == 0.5  # q over patients


def test_a_hospital_plans_over_its_patients(tmp_path):
    from fedgen.federation.hospital import Hospital, silos_for

    overrides = ["model.init=null", "data.image_size=16", "data.num_patients=60", "data.images_per_patient=3",
                 "federation.num_hospitals=2", "training.batch_size=8"]
    example = Hospital(load_config(overrides), silos_for(load_config(overrides))[0], tmp_path / "e")
    cfg = load_config([*overrides, "privacy.unit=patient"])
    patient = Hospital(cfg, silos_for(cfg)[0], tmp_path / "p")
    patients = len(set(patient.silo.train.patient_ids))
    assert patient.plan.num_examples == patients < example.plan.num_examples == len(example.silo.train)
    assert patient.plan.sample_rate == pytest.approx(8 / patients)
