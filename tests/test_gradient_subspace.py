"""DP-SGD in a public gradient subspace: every step moves the model along the public directions
only, the accounting is DP-SGD's unchanged, and impossible settings are refused."""

import copy

import pytest
import torch

from fedgen.config import ConfigError, load_config
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, make_plan
from fedgen.privacy.dp_sgd import train_locally
from fedgen.privacy.gradient_subspace import public_subspace

SMALL = ["model.init=null", "data.image_size=16", "pretrain.num_patients=48", "training.optimizer=sgd",
         "training.learning_rate=0.05", "privacy=eps8"]


def _train(cfg, unet, images):
    plan = make_plan(len(images), batch_size=8, local_epochs=1, num_rounds=1)
    ledger = EpsilonLedger.start(cfg.privacy, plan)
    train_locally(unet, Diffusion(build_scheduler(cfg.model)), images, cfg, plan, ledger, (cfg.seed, 0, 1))
    return ledger


def _flat(unet) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in unet.parameters()])


def test_each_noisy_step_moves_the_model_along_the_public_directions_only():
    cfg = load_config([*SMALL, "training.gradient_subspace=4", "training.subspace_images=32"])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 16)
    basis = public_subspace(copy.deepcopy(unet), Diffusion(build_scheduler(cfg.model)), cfg, (cfg.seed, 1)).basis
    assert basis.shape == (_flat(unet).numel(), 4)
    assert torch.allclose(basis.double().T @ basis.double(), torch.eye(4, dtype=torch.float64), atol=1e-5)
    before = _flat(unet)
    _train(cfg, unet, torch.rand(24, 1, 16, 16) * 2 - 1)
    moved = _flat(unet) - before
    outside = moved - basis @ (basis.T @ moved)
    assert moved.norm() > 1e-3  # it trained (signal and the noise, both in the subspace)
    assert outside.norm() < 1e-3 * moved.norm()  # float32 rounding; unprojected steps: ~1


def test_the_subspace_changes_the_noise_not_the_accounting():
    images = torch.rand(24, 1, 16, 16) * 2 - 1
    epsilons = []
    for extra in ([], ["training.gradient_subspace=4", "training.subspace_images=32"]):
        cfg = load_config([*SMALL, *extra])
        torch.manual_seed(0)
        epsilons.append(_train(cfg, build_unet(cfg.model, 16), images).epsilon)
    assert epsilons[0] == pytest.approx(epsilons[1])


def test_impossible_subspaces_are_refused_before_training():
    with pytest.raises(ConfigError, match="training.gradient_subspace"):
        load_config([*SMALL, "training.gradient_subspace=64", "training.subspace_images=32"])
    cfg = load_config([*SMALL, "training.gradient_subspace=4", "training.subspace_images=100"])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 16)
    before = _flat(unet)
    with pytest.raises(ConfigError, match="public archive holds 48 images"):
        _train(cfg, unet, torch.rand(24, 1, 16, 16) * 2 - 1)
    assert torch.equal(_flat(unet), before)
