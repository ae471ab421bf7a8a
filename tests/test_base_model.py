"""Fine-tuning from a base: model.init, fedgen pretrain, trainable subsets, EMA, virtual steps."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedgen.base_model import initial_unet, load_base, pretrained_home, weights_hash
from fedgen.config import ConfigError, load_config
from fedgen.data.public import public_archive
from fedgen.data.silos import build_silos
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, make_plan
from fedgen.privacy.dp_optimizer import NoisingDPOptimizer
from fedgen.privacy.dp_sgd import noisy_step, train_locally
from fedgen.privacy.randomness import ReproducibleRandomness

SMALL = ["model.init=null", "data.image_size=16", "data.num_patients=60", "pretrain.num_patients=48", "pretrain.epochs=2"]


def _save_base(cfg, folder, seed=7):
    torch.manual_seed(seed)
    unet = build_unet(cfg.model, cfg.data.image_size)
    DDPMPipeline(unet=unet, scheduler=build_scheduler(cfg.model)).save_pretrained(str(folder))
    return unet


def test_a_run_starts_from_the_base_weights_exactly(tmp_path):
    cfg = load_config(SMALL)
    base = _save_base(cfg, tmp_path / "base")
    started = initial_unet(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=str(tmp_path / "base"))), tmp_path)
    assert weights_hash(started.state_dict()) == weights_hash(base.state_dict())
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    t = torch.full((4,), 300)
    with torch.no_grad():
        assert torch.equal(started(x, t).sample, base.eval()(x, t).sample)  # the same loss at round 0
    from_seed = initial_unet(cfg, tmp_path)  # model.init=null: the seeded random weights
    assert weights_hash(from_seed.state_dict()) != weights_hash(base.state_dict())


def test_a_base_that_does_not_fit_is_refused_naming_both_shapes(tmp_path):
    cfg = load_config(SMALL)
    other = load_config(["data.image_size=32"])
    _save_base(other, tmp_path / "base32")
    with pytest.raises(ConfigError, match=r"sample_size: base 32, config 16"):
        load_base(tmp_path / "base32", cfg)
    wide = load_config([*SMALL, "model.block_out_channels=[32,32,64]"])
    _save_base(wide, tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"block_out_channels: base \[32, 32, 64\], config \[16, 32, 32\]"):
        load_base(tmp_path / "wide", cfg)


def test_a_missing_or_corrupt_base_is_a_clear_error(tmp_path):
    cfg = load_config(SMALL)
    with pytest.raises(ConfigError, match="does not exist"):
        load_base(tmp_path / "nowhere", cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers"):
        load_base(tmp_path / "empty", cfg)
    _save_base(cfg, tmp_path / "broken")
    weights = next((tmp_path / "broken" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match="cannot be read"):
        load_base(tmp_path / "broken", cfg)


def test_the_update_is_the_ema_of_the_local_iterates(tmp_path):
    """The raw iterates do not depend on the EMA; the weights returned are their average."""
    cfg = load_config([*SMALL, "privacy.reproducible_noise=true"])
    plan = make_plan(24, batch_size=8, local_epochs=2, num_rounds=1)
    images = torch.rand(24, 1, 16, 16) * 2 - 1
    decay = 0.8

    def run(ema_decay):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, ema_decay=ema_decay))
        torch.manual_seed(0)
        unet = build_unet(c.model, 16)
        start = [p.detach().clone() for p in unet.parameters()]
        iterates = []
        handle = register_optimizer_step_post_hook(
            lambda opt, *_: iterates.append([p.detach().clone() for p in unet.parameters()])
        )
        try:
            train_locally(unet, Diffusion(build_scheduler(c.model)), images, c, plan,
                          EpsilonLedger.start(c.privacy, plan), (0, 0, 1))
        finally:
            handle.remove()
        return unet, start, iterates

    _, start, raw = run(0.0)
    averaged, _, raw_again = run(decay)
    assert len(raw) == plan.steps_per_round and all(
        torch.equal(a, b) for x, y in zip(raw, raw_again) for a, b in zip(x, y)
    )
    expected = start
    for step in raw:
        expected = [e * decay + (1 - decay) * w for e, w in zip(expected, step)]
    for p, e in zip(averaged.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_virtual_steps_sum_the_same_clipped_gradients_as_one_batch():
    cfg = load_config(SMALL)
    diffusion = Diffusion(build_scheduler(cfg.model))
    x0 = torch.rand(7, 1, 16, 16) * 2 - 1
    t, eps = diffusion.draw(x0, 1, generator=torch.Generator().manual_seed(0))

    def step(chunk):
        torch.manual_seed(0)
        unet = build_unet(cfg.model, 16)
        opt = NoisingDPOptimizer(torch.optim.SGD(unet.parameters(), lr=1.0), noise_multiplier=0.5,
                                 max_grad_norm=0.1, expected_batch_size=7,
                                 randomness=ReproducibleRandomness(0, 1))
        losses = noisy_step(opt, unet, diffusion, x0, t, eps, chunk)
        return losses, [p.grad.clone() for p in unet.parameters()]

    whole_losses, whole = step(0)
    chunk_losses, chunked = step(3)  # chunks of 3, 3, 1: one release
    assert torch.allclose(whole_losses, chunk_losses, atol=1e-6)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_public_archive_shares_no_patient_or_scanner_with_the_hospitals():
    cfg = load_config(SMALL)
    archive = public_archive(cfg.pretrain, 16, cfg.pretrain.seed)
    hospitals = build_silos(cfg)
    for silo in hospitals:
        for role in (silo.train, silo.heldout, silo.validation):
            assert not set(role.patient_ids) & set(archive.patient_ids)
            assert not set(role.sources) & set(archive.sources)
    assert len(set(archive.sources)) == cfg.pretrain.num_sources
    assert len(archive) == cfg.pretrain.num_patients


def test_pretrain_saves_a_cached_base_and_resumes(tmp_path):
    from fedgen.running.pretrain import pretrain

    cfg = load_config([*SMALL, f"runs_dir={tmp_path}", "model.init=pretrained", "federation.sampling_steps=2"])
    said = []
    pipeline = pretrain(cfg, tmp_path, echo=said.append, progress=False)
    assert pipeline == pretrained_home(cfg, tmp_path) / "pipeline"
    info = json.loads((pipeline.parent / "pretrain.json").read_text())
    assert info["steps"] == 2 * 2 and info["archive"]["images"] == 48
    assert (pipeline.parent / "samples.png").exists() and not (pipeline.parent / "checkpoint.pt").exists()
    unet = initial_unet(cfg, tmp_path)  # model.init=pretrained loads exactly what was saved
    assert weights_hash(unet.state_dict()) == info["weights_sha256"]
    said.clear()
    assert pretrain(cfg, tmp_path, echo=said.append, progress=False) == pipeline
    assert any("cached" in line for line in said)

    # An interrupted pretraining resumes after its last finished epoch.
    longer = load_config([*SMALL, f"runs_dir={tmp_path}", "model.init=pretrained", "pretrain.epochs=3",
                          "federation.sampling_steps=2"])
    home = pretrained_home(longer, tmp_path)
    home.mkdir(parents=True)
    torch.save({"epoch": 2, "model": unet.state_dict(),
                "optimizer": torch.optim.Adam(unet.parameters()).state_dict()}, home / "checkpoint.pt")
    said.clear()
    pretrain(longer, tmp_path, echo=said.append, progress=False)
    assert any("resuming after epoch 2" in line for line in said)
    assert sum("pretrain epoch" in line for line in said) == 1
    assert np.isfinite(json.loads((home / "pretrain.json").read_text())["final_loss"])
