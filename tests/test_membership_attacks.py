"""Membership attacks against models that provably memorised: the ideal denoiser of a finite set
(closed form) and a tiny UNet trained without DP on a few synthetic X-rays until it memorises.

The trained model is built once per module (about 20 s on one thread of this 2-core machine, up to
about 50 s while other jobs load it); everything else only runs forward passes.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from attacks.dataset_inference import DATASET_TESTS, dataset_inference
from attacks.loss import LossConfig
from attacks.membership import ATTACKS, build_attack, run_attacks
from attacks.metrics import auc
from attacks.pia import PiaConfig
from attacks.secmi import SecMIConfig
from fedgen.config import ModelConfig
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet

# The smallest setup found to memorise reliably in well under a minute on 2 shared CPU cores: 16
# images of 16x16, the `tiny` UNet (16/32/32 channels, 267k parameters), full-batch Adam 2e-3 with
# 4 (t, noise) draws per image per step, 200 steps. Over model seeds 0-2 the best attack (SimA)
# then had AUC 0.99-1.0, the loss attack 0.94-0.97; 12 images needed as many steps, and at 160
# steps the best AUC fell to 0.91 for one seed. Members and held-out images are different patients
# of one synthetic source: the same distribution.
IMAGE_SIZE = 16
NUM_MEMBERS = 16
TRAIN_STEPS = 200
TRAIN_DRAWS = 4
LEARNING_RATE = 2e-3
DELTA = 1e-5


def _smooth_random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Fallback data: Gaussian-smoothed white noise, rescaled per image to [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 2, 2))
    lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
    return torch.from_numpy(2 * (x - lo) / (hi - lo) - 1).float().unsqueeze(1)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """n i.i.d. images [n,1,size,size] in [-1,1]: one synthetic X-ray per patient."""
    try:
        from fedgen.data.synthetic import generate_xrays
    except ImportError:
        return _smooth_random_images(n, size, seed)
    return generate_xrays(
        num_patients=n, images_per_patient=1, image_size=size, num_sources=1,
        finding_rate=0.3, seed=seed,
    ).images


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread gains little on a free machine, and on a
    shared, oversubscribed one the two threads' synchronisation made each step 4-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _stay_on_one_thread(_one_thread):
    torch.set_num_threads(1)  # after conftest's per-test set_num_threads(2)


@pytest.fixture(scope="module")
def splits() -> dict[str, torch.Tensor]:
    x = _images(3 * NUM_MEMBERS, IMAGE_SIZE, seed=0)
    return {
        "members": x[:NUM_MEMBERS],
        "heldout": x[NUM_MEMBERS : 2 * NUM_MEMBERS],
        "strangers": x[2 * NUM_MEMBERS :],
    }


def _train(unet: UNet2DModel, scheduler: DDPMScheduler, x: torch.Tensor) -> None:
    diffusion = Diffusion(scheduler)
    optimizer = torch.optim.Adam(unet.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(1)
    unet.train()
    for _ in range(TRAIN_STEPS):
        t, eps = diffusion.draw(x, TRAIN_DRAWS, generator=generator)
        loss = diffusion.per_example_loss(unet_denoiser(unet), x, t, eps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


@pytest.fixture(scope="module")
def memorised(splits, _one_thread) -> tuple[UNet2DModel, DDPMScheduler]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig()
    unet, scheduler = build_unet(cfg, IMAGE_SIZE), build_scheduler(cfg)
    start = time.perf_counter()
    _train(unet, scheduler, splits["members"])
    print(f"\ntrained {TRAIN_STEPS} steps in {time.perf_counter() - start:.1f} s")
    return unet, scheduler


@pytest.fixture(scope="module")
def untrained() -> tuple[UNet2DModel, DDPMScheduler]:
    torch.manual_seed(1)
    cfg = ModelConfig()
    return build_unet(cfg, IMAGE_SIZE).eval(), build_scheduler(cfg)


class IdealDenoiser(torch.nn.Module):
    """The exact minimiser of the DDPM loss on a finite training set: it memorises perfectly.

    eps*(x_t, t) = (x_t - sqrt(abar_t) E[x0 | x_t]) / sqrt(1 - abar_t), with E[x0 | x_t] the
    softmax-weighted mean of the training images under q(x_t | x0). Called like a UNet2DModel.
    """

    def __init__(self, train: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("train_images", train.double())
        self.register_buffer("abar", alphas_cumprod.double())

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = True):
        a = self.abar[t].reshape(-1, 1)  # [B, 1]
        xf = x.double().flatten(1)  # [B, D]
        train = self.train_images.flatten(1)  # [M, D]
        d2 = ((xf[:, None, :] - a.sqrt()[:, :, None] * train[None]) ** 2).sum(-1)  # [B, M]
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)  # posterior over training images
        eps = (xf - a.sqrt() * (w @ train)) / (1 - a).sqrt()
        return (eps.reshape(x.shape).to(x.dtype),)


# --- registry and configs -------------------------------------------------------------------


def test_fallback_images_are_in_range():
    x = _smooth_random_images(5, IMAGE_SIZE, seed=0)
    assert x.shape == (5, 1, IMAGE_SIZE, IMAGE_SIZE) and x.min() == -1 and x.max() == 1


def test_registry_names_the_five_attacks():
    assert set(ATTACKS) == {"loss", "pia", "pian", "secmi", "sima"}
    for name, cls in ATTACKS.items():
        assert cls.name == name
        assert build_attack(name).config == cls.config_class()
    with pytest.raises(KeyError, match="unknown membership attack"):
        build_attack("lira")


def test_queries_per_image_follow_the_config():
    assert build_attack("loss").queries_per_image == 12
    assert build_attack("loss", LossConfig(timesteps=(10, 20), draws=3)).queries_per_image == 6
    assert build_attack("pia").queries_per_image == 2
    assert build_attack("secmi").queries_per_image == 12
    assert build_attack("secmi", SecMIConfig(t_sec=40, interval=20)).queries_per_image == 4
    assert build_attack("sima").queries_per_image == 1


def test_bad_settings_and_inputs_are_refused(untrained, splits):
    unet, scheduler = untrained
    with pytest.raises(ValueError, match="loss.draws"):
        LossConfig(draws=0)
    with pytest.raises(ValueError, match="loss.timesteps"):
        LossConfig(timesteps=())
    with pytest.raises(ValueError, match="pia.timestep"):
        PiaConfig(timestep=0)
    with pytest.raises(ValueError, match="multiple of secmi.interval"):
        SecMIConfig(t_sec=95)
    with pytest.raises(TypeError, match="config must be PiaConfig"):
        build_attack("pia", LossConfig())
    with pytest.raises(ValueError, match="outside the schedule"):
        build_attack("pia", PiaConfig(timestep=1000)).score(unet, scheduler, splits["members"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        build_attack("sima").score(unet, scheduler, splits["members"] * 255)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        build_attack("sima").score(unet, scheduler, splits["members"][0])


# --- every attack: shape, determinism, query count ------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_scores_are_finite_deterministic_and_batch_independent(untrained, splits, name):
    unet, scheduler = untrained
    x = torch.cat([splits["members"][:5], splits["heldout"][:4]])
    attack = build_attack(name)
    a = attack.score(unet, scheduler, x, batch_size=64)
    b = attack.score(unet, scheduler, x, batch_size=64)
    assert a.shape == (9,) and a.dtype == np.float64 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    # Per-image noise is seeded by the image, so batching and order do not change a score.
    c = attack.score(unet, scheduler, x.flip(0), batch_size=4)
    np.testing.assert_allclose(c[::-1], a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_queries_per_image_counts_the_forward_passes(untrained, splits, name):
    unet, scheduler = untrained
    x = splits["members"][:7]
    seen = []
    handle = unet.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        attack = build_attack(name)
        attack.score(unet, scheduler, x, batch_size=3)
    finally:
        handle.remove()
    assert sum(seen) == attack.queries_per_image * x.shape[0]
    assert len(seen) == attack.queries_per_image * math.ceil(x.shape[0] / 3)


def test_unet_mode_is_restored(untrained, splits):
    unet, scheduler = untrained
    unet.train()
    build_attack("sima").score(unet, scheduler, splits["members"][:2])
    assert unet.training
    unet.eval()


# --- against models that memorised ------------------------------------------------------------


def test_attacks_find_the_members_of_the_ideal_denoiser(splits):
    """The closed-form memoriser: the attacks rank every member above every non-member.

    SecMI is left out: the ideal denoiser maps a non-member at t = 0 onto the DDIM trajectory of
    its nearest training image, so non-members' forward-and-back errors can vanish too."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    members, heldout = splits["members"][:8], splits["heldout"][:8]
    ideal = IdealDenoiser(members, scheduler.alphas_cumprod)
    names = ["loss", "pia", "pian", "sima"]
    results = run_attacks(ideal, scheduler, members, heldout, names, DELTA, bootstrap=200)
    assert {name: r.auc for name, r in results.items()} == {name: 1.0 for name in names}


def _reference_scores(unet, scheduler, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """PIA, PIAN and SecMI-stat written as in kong13661/PIA `DDPM/components.py`: DDIM steps in
    its y = x / sqrt(abar), p = sqrt(1 / abar - 1) form (y' = y + eps (p' - p)), with the
    reference defaults (t = 200, l4; t_sec = 100, step 10). Means over pixels, negated."""
    abar = scheduler.alphas_cumprod.double()

    def eps(x, t):
        with torch.no_grad():
            return unet(x.float(), torch.full((x.shape[0],), t), return_dict=False)[0].double()

    def ddim(x, s, s_next):
        p, p_next = (1 / abar[s] - 1).sqrt(), (1 / abar[s_next] - 1).sqrt()
        y_next = eps(x, s) * (p_next - p) + x / abar[s].sqrt()
        return y_next * abar[s_next].sqrt()

    x0 = x0.double()
    e0 = eps(x0, 0)
    e0n = e0 / e0.abs().mean(dim=(1, 2, 3), keepdim=True) * (2 / torch.pi) ** 0.5
    out = {}
    for name, e in (("pia", e0), ("pian", e0n)):
        xt = abar[200].sqrt() * x0 + (1 - abar[200]).sqrt() * e
        out[name] = -((eps(xt, 200) - e).abs() ** 4).flatten(1).mean(1)
    x = x0
    for s in range(0, 100, 10):
        x = ddim(x, s, s + 10)
    back = ddim(ddim(x, 100, 110), 110, 100)
    out["secmi"] = -((x - back) ** 2).flatten(1).mean(1)
    return out


def test_pia_and_secmi_match_the_reference_formulation(untrained, splits):
    unet, scheduler = untrained
    x = splits["members"][:6]
    for name, expected in _reference_scores(unet, scheduler, x).items():
        got = build_attack(name).score(unet, scheduler, x)
        np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, err_msg=name)


def test_trained_model_memorised_its_members(memorised, splits):
    """Independent of the attack code: the training loss itself (fedgen's per-example loss, the
    same t grid for every image) ranks members below held-out images (scikit-learn's AUC)."""
    unet, scheduler = memorised
    diffusion = Diffusion(scheduler)
    generator = torch.Generator().manual_seed(123)
    losses = []
    for split in ("members", "heldout"):
        x = splits[split]
        t = torch.arange(20, 201, 20).repeat(2).expand(x.shape[0], -1)
        eps = torch.randn((*t.shape, *x.shape[1:]), generator=generator)
        with torch.no_grad():
            losses.append(diffusion.per_example_loss(unet_denoiser(unet), x, t, eps).numpy())
    member_loss, heldout_loss = losses
    assert member_loss.mean() < 0.9 * heldout_loss.mean()
    is_member = np.r_[np.ones(NUM_MEMBERS), np.zeros(NUM_MEMBERS)]
    assert roc_auc_score(is_member, -np.r_[member_loss, heldout_loss]) >= 0.9


def test_best_attack_separates_members_of_the_trained_model(memorised, splits):
    unet, scheduler = memorised
    results = run_attacks(
        unet, scheduler, splits["members"], splits["heldout"], sorted(ATTACKS), DELTA, bootstrap=200
    )
    aucs = {name: round(r.auc, 3) for name, r in results.items()}
    print("\nAUC per attack on the memorised UNet:", aucs)
    assert max(aucs.values()) >= 0.95, aucs
    for name, r in results.items():
        assert r.num_members == r.num_nonmembers == NUM_MEMBERS
        assert r.extra["queries_per_image"] == ATTACKS[name]().queries_per_image
        assert r.extra["attack_config"]


def test_untrained_model_gives_chance_auc(untrained, splits):
    """Same-distribution members and non-members, a model that saw neither: AUC 0.5 lies in each
    bootstrap interval (at 1 - 0.05 / 5, a family-wise 95% for the five attacks)."""
    unet, scheduler = untrained
    results = run_attacks(
        unet, scheduler, splits["members"], splits["heldout"], sorted(ATTACKS), DELTA,
        confidence=1 - 0.05 / len(ATTACKS), bootstrap=500,
    )
    for name, r in results.items():
        assert r.auc_ci[0] <= 0.5 <= r.auc_ci[1], (name, r.auc, r.auc_ci)


@pytest.mark.parametrize("test", sorted(DATASET_TESTS))
def test_dataset_inference_flags_the_training_set_and_not_strangers(memorised, splits, test):
    unet, scheduler = memorised
    attack = build_attack("loss")
    reference = attack.score(unet, scheduler, splits["heldout"])
    members = attack.score(unet, scheduler, splits["members"])
    strangers = attack.score(unet, scheduler, splits["strangers"])
    assert dataset_inference(members, reference, test=test) < 0.05
    assert dataset_inference(strangers, reference, test=test) > 0.05


def test_dataset_inference_on_known_distributions():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 70)
    assert dataset_inference(rng.normal(1, 1, 70), reference) < 1e-4
    # One-sided: suspects scoring LOWER than non-members are no evidence of membership.
    assert dataset_inference(rng.normal(-1, 1, 70), reference) > 0.99
    # Under H0 the p-value is uniform: about 5% of null sets fall below 0.05.
    null_p = [dataset_inference(rng.normal(0, 1, 70), rng.normal(0, 1, 70)) for _ in range(400)]
    assert 0.02 < np.mean(np.array(null_p) < 0.05) < 0.09
    with pytest.raises(KeyError, match="unknown dataset test"):
        dataset_inference(reference, reference, test="ks")
    with pytest.raises(ValueError, match="NaN"):
        dataset_inference(np.r_[reference, np.nan], reference)


# --- a diffusers model built without fedgen ---------------------------------------------------


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_attacks_run_on_a_plain_diffusers_unet(scheduler_class):
    torch.manual_seed(2)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    scheduler = scheduler_class(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    results = run_attacks(unet, scheduler, x[:3], x[3:], sorted(ATTACKS), DELTA, bootstrap=50)
    assert set(results) == set(ATTACKS)
    for name in ATTACKS:
        scores = build_attack(name).score(unet, scheduler, x)
        assert scores.shape == (6,) and np.all(np.isfinite(scores))
    assert 0.0 <= auc(scores, np.r_[np.ones(3, bool), np.zeros(3, bool)]) <= 1.0
