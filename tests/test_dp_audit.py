"""The white-box DP-SGD audit: canaries pass through the real step, an honest DP-SGD stays below its
accountant, deliberately broken ones are caught, and `fedgen audit-dp` writes dp_audit.json."""

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from opacus.accountants.utils import get_noise_multiplier

from fedgen.cli import main
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.dp_audit import DpSgdRecipe, audit_dp_sgd
from fedgen.privacy.gradient_canaries import CANARY_NORM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def small(base_config):
    """A 17k-parameter UNet on 8x8 images and 8 images: the audit's cost is the canaries'."""
    model = dataclasses.replace(
        base_config.model, block_out_channels=[8, 8], down_block_types=["DownBlock2D"] * 2,
        up_block_types=["UpBlock2D"] * 2, mid_block_attention=False,
    )
    torch.manual_seed(0)
    return build_unet(model, 8), Diffusion(build_scheduler(model)), torch.rand(8, 1, 8, 8) * 2 - 1


@functools.cache
def _recipe(epsilon: float, q: float = 0.5, steps: int = 20) -> DpSgdRecipe:
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=q, steps=steps,
                                 accountant="rdp", epsilon_tolerance=0.01)
    return DpSgdRecipe(sigma, q, steps, max_grad_norm=1.0, delta=1e-5)


def test_canaries_go_through_the_real_step(small):
    """Noise off, q = 1, one step: each included canary (norm 4C) is clipped to C and divided by
    the expected batch, so its score (the update along it, in units of C / E[B]) is 1; an excluded
    one's is 0. Without clipping, the same step lets all of its 4C through."""
    unet, diffusion, images = small
    recipe = DpSgdRecipe(0.0, 1.0, 1, max_grad_norm=0.5, delta=1e-5)
    result = audit_dp_sgd(unet, diffusion, images, recipe, 200, seed=1)
    clipped = CANARY_NORM / (CANARY_NORM + 1e-6 / recipe.max_grad_norm)  # Opacus's C / (norm + 1e-6)
    assert 0 < result.included < 200
    np.testing.assert_allclose(result.scores[result.is_included], clipped, rtol=1e-4)
    np.testing.assert_allclose(result.scores[~result.is_included], 0.0, atol=1e-4)
    unclipped = audit_dp_sgd(unet, diffusion, images, recipe, 200, seed=1, _broken="no-clipping")
    np.testing.assert_allclose(unclipped.scores[unclipped.is_included], CANARY_NORM, rtol=1e-4)


def test_honest_dp_sgd_stays_below_its_epsilon(small):
    unet, diffusion, images = small
    recipe = _recipe(2.0)
    for seed in range(3):
        result = audit_dp_sgd(unet, diffusion, images, recipe, 1000, seed=seed)
        assert not result.is_broken
        assert 0 < result.epsilon_lb < result.accountant_epsilon
        assert result.epsilon_lb_steinke < result.accountant_epsilon
        assert result.to_dict()["verdict"].startswith("consistent")


@pytest.mark.parametrize("broken", ["noise/4", "no-clipping"])
def test_broken_dp_sgd_is_caught(small, broken):
    unet, diffusion, images = small
    result = audit_dp_sgd(unet, diffusion, images, _recipe(2.0), 1000, _broken=broken)
    assert result.epsilon_lb > result.accountant_epsilon
    assert result.is_broken and result.to_dict()["verdict"].startswith("broken")


def test_unknown_broken_variant_is_refused(small):
    with pytest.raises(ValueError, match="unknown broken variant"):
        audit_dp_sgd(*small, DpSgdRecipe(1.0, 0.5, 1, 1.0, 1e-5), 10, _broken="noise/2")


def _run_dir(base_config, tmp_path, epsilon: float):
    cfg = dataclasses.replace(
        base_config,
        data=dataclasses.replace(base_config.data, image_size=16, num_patients=48),
        model=dataclasses.replace(base_config.model, init=None),
        privacy=dataclasses.replace(base_config.privacy, target_epsilon=epsilon),
        training=dataclasses.replace(base_config.training, batch_size=16, device="cpu"),
        federation=dataclasses.replace(base_config.federation, num_hospitals=1, num_rounds=1, local_epochs=4),
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return run


def test_audit_dp_command_writes_dp_audit_json(base_config, tmp_path, capsys):
    run = _run_dir(base_config, tmp_path, 8.0)
    assert main(["audit-dp", str(run), "--canaries", "400", "--images", "8"]) == 0
    report = json.loads((run / "dp_audit.json").read_text())
    assert report["canaries"] == 400 and report["images"] == 8
    assert report["epsilon_lb"] < report["accountant_epsilon"] <= 8.0
    assert {"correct", "guesses", "verdict", "epsilon_lb_steinke", "recipe"} <= set(report)
    assert "wrote" in capsys.readouterr().out


def test_audit_dp_command_fails_loudly_on_a_broken_implementation(base_config, tmp_path, capsys, monkeypatch):
    import fedgen.running.dp_audit as command

    run = _run_dir(base_config, tmp_path, 1.0)

    def too_little_noise(*args, _broken=None, **kwargs):
        return audit_dp_sgd(*args, _broken="noise/4", **kwargs)

    monkeypatch.setattr(command, "audit_dp_sgd", too_little_noise)
    assert main(["audit-dp", str(run), "--canaries", "2000", "--images", "8"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "the DP-SGD implementation is broken" in error
    assert json.loads((run / "dp_audit.json").read_text())["verdict"].startswith("broken")
