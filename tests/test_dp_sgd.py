"""Local DP-SGD training: cumulative epsilon across rounds, clipping, empty batches, plain mode."""

import dataclasses

import pytest
import torch

from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import (
    BudgetExceededError,
    EpsilonLedger,
    TrainingPlan,
    epsilon_of,
    make_plan,
)
from fedgen.privacy.dp_sgd import learning_rate_at, train_locally


@pytest.fixture()
def setup(base_config):
    torch.manual_seed(0)
    cfg = dataclasses.replace(base_config, data=dataclasses.replace(base_config.data, image_size=16))
    unet = build_unet(cfg.model, 16)
    diffusion = Diffusion(build_scheduler(cfg.model))
    images = torch.rand(64, 1, 16, 16) * 2 - 1
    return cfg, unet, diffusion, images


def _flat(unet):
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_three_rounds_through_the_ledger_file_equal_one_accountant(setup, tmp_path):
    cfg, unet, diffusion, images = setup
    plan = make_plan(len(images), batch_size=16, local_epochs=1, num_rounds=3)
    path = tmp_path / "ledger.json"
    epsilons = []
    for server_round in (1, 2, 3):
        ledger = EpsilonLedger.open(path, cfg.privacy, plan)
        result = train_locally(unet, diffusion, images, cfg, plan, ledger, (0, 0, server_round), server_round)
        ledger.save(path)
        epsilons.append(result.epsilon)
        assert result.steps == plan.steps_per_round
    ledger = EpsilonLedger.load(path)
    assert ledger.steps == plan.total_steps
    expected = epsilon_of([(ledger.noise_multiplier, plan.sample_rate, plan.total_steps)], "rdp", 1e-5)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-12)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= cfg.privacy.target_epsilon
    with pytest.raises(BudgetExceededError):
        train_locally(unet, diffusion, images, cfg, plan, ledger, (0, 0, 4), 4)


def test_update_is_bounded_by_clipping(setup):
    """Without noise, one SGD step (lr 1) moves the weights by at most C * |batch| / E[batch]."""
    cfg, unet, diffusion, images = setup
    cfg = dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, max_grad_norm=1e-3),
        training=dataclasses.replace(cfg.training, optimizer="sgd", learning_rate=1.0),
    )
    plan = TrainingPlan(num_examples=64, sample_rate=0.25, steps_per_epoch=1, local_epochs=1, num_rounds=1)
    ledger = EpsilonLedger("rdp", 1e-5, float("inf"), 0.0, 0.25, 1)
    before = _flat(unet)
    train_locally(unet, diffusion, images, cfg, plan, ledger, (0, 0, 1))
    moved = (_flat(unet) - before).norm().item()
    assert 0 < moved <= 1e-3 * 64 / 16 + 1e-9  # at most all 64 sampled, expected batch 16
    # Unclipped, the same step moves the weights far more: clipping really happened.
    assert moved < 0.5 * _plain_step_norm(setup)


def _plain_step_norm(setup):
    cfg, _, diffusion, images = setup
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 16)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, optimizer="sgd", learning_rate=1.0))
    plan = TrainingPlan(num_examples=64, sample_rate=0.25, steps_per_epoch=1, local_epochs=1, num_rounds=1)
    before = _flat(unet)
    train_locally(unet, diffusion, images, cfg, plan, None, (0, 0, 1))
    return (_flat(unet) - before).norm().item()


def test_empty_poisson_batches_still_take_noisy_steps(setup):
    cfg, unet, diffusion, images = setup
    # q = 0.01 on 8 images: most batches are empty.
    plan = TrainingPlan(num_examples=8, sample_rate=0.01, steps_per_epoch=10, local_epochs=1, num_rounds=1)
    ledger = EpsilonLedger("rdp", 1e-5, float("inf"), 1.0, 0.01, 10)
    before = _flat(unet)
    result = train_locally(unet, diffusion, images[:8], cfg, plan, ledger, (0, 0, 1))
    assert result.steps == 10 and ledger.steps == 10
    assert not torch.equal(before, _flat(unet))  # noise moved the weights even on empty batches


def test_plain_mode_learns_through_the_same_loop(setup):
    cfg, unet, diffusion, images = setup
    few = images[:8]
    plan = TrainingPlan(num_examples=8, sample_rate=1.0, steps_per_epoch=1, local_epochs=30, num_rounds=1)
    first = train_locally(unet, diffusion, few, cfg, dataclasses.replace(plan, local_epochs=1), None, (0, 0, 0))
    result = train_locally(unet, diffusion, few, cfg, plan, None, (0, 0, 1))
    assert result.epsilon == float("inf") and result.noise_multiplier == 0.0
    assert result.steps == 30
    assert result.loss < first.loss


def test_cosine_schedule_falls_from_the_rate_to_zero_over_every_planned_round(base_config):
    plan = TrainingPlan(num_examples=40, sample_rate=0.25, steps_per_epoch=4, local_epochs=5, num_rounds=3)  # 60 steps
    rate = 1e-3
    cosine = dataclasses.replace(base_config, training=dataclasses.replace(
        base_config.training, learning_rate=rate, lr_schedule="cosine"))
    constant = dataclasses.replace(cosine, training=dataclasses.replace(cosine.training, lr_schedule="constant"))
    rates = [learning_rate_at(cosine, plan, r, s) for r in (1, 2, 3) for s in range(plan.steps_per_round)]
    assert rates[0] == rate
    assert rates[30] == pytest.approx(rate / 2)  # half way through the plan: round 2's 11th step
    assert rates[-1] < rate * 0.01
    assert all(a > b for a, b in zip(rates, rates[1:]))  # falls at every step, across rounds too
    assert {learning_rate_at(constant, plan, r, s) for r in (1, 3) for s in (0, 19)} == {rate}


def test_train_locally_steps_at_the_scheduled_rate(setup, monkeypatch):
    cfg, unet, diffusion, images = setup
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, lr_schedule="cosine", optimizer="adam"))
    plan = TrainingPlan(num_examples=64, sample_rate=0.5, steps_per_epoch=2, local_epochs=2, num_rounds=3)
    seen = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train_locally(unet, diffusion, images, cfg, plan, None, (0, 0, 2), server_round=2)
    assert seen == [learning_rate_at(cfg, plan, 2, s) for s in range(plan.steps_per_round)]
    assert seen[-1] < seen[0] < cfg.training.learning_rate  # round 2 of 3: below the start rate
