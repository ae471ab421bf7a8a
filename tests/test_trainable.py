"""What hospitals train: named groups and LoRA adapters. Frozen parameters come back bit-identical
and get neither a per-example gradient nor noise; adapters have exact per-example gradients and
merge into a plain UNet."""

import pytest
import torch

from fedgen.config import ConfigError, load_config
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, make_plan
from fedgen.privacy.dp_sgd import train_locally
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.privacy.randomness import ReproducibleRandomness
from fedgen.trainable import merge_lora, prepare_training

SMALL = ["model.init=null", "data.image_size=16", "privacy.reproducible_noise=true"]
LORA = ["training.trainable=lora", "training.lora_rank=2", "training.lora_targets=[conv1,to_q,to_v]"]


def _unet(cfg, seed=0):
    torch.manual_seed(seed)
    return build_unet(cfg.model, 16)


def _train_with_spy(unet, cfg, steps_seen: list[int]) -> None:
    """One DP local training of `unet`, recording how many coordinates each noise draw covers."""

    class Spy(ReproducibleRandomness):
        def gaussian(self, reference, std):
            steps_seen.append(reference.numel())
            return super().gaussian(reference, std)

    import fedgen.privacy.dp_sgd as dp_sgd

    original = dp_sgd.privacy_randomness
    dp_sgd.privacy_randomness = lambda reproducible, *parts: Spy(*parts)
    try:
        plan = make_plan(24, batch_size=8, local_epochs=1, num_rounds=1)
        ledger = EpsilonLedger.start(cfg.privacy, plan)
        train_locally(unet, Diffusion(build_scheduler(cfg.model)), torch.rand(24, 1, 16, 16) * 2 - 1, cfg, plan, ledger, (0, 0, 1))
    finally:
        dp_sgd.privacy_randomness = original
    return plan


def test_unknown_groups_and_empty_selections_are_refused():
    cfg = load_config([*SMALL, "training.trainable=norms_biases+bogus"])
    with pytest.raises(ConfigError, match="unknown group.*bogus"):
        prepare_training(_unet(cfg), cfg.training)
    cfg = load_config(SMALL)
    unet = _unet(cfg)
    assert prepare_training(unet, cfg.training) == sum(p.numel() for p in unet.parameters())


def test_frozen_parameters_are_bit_identical_and_get_no_gradient_or_noise():
    cfg = load_config([*SMALL, "training.trainable=norms_biases"])
    unet = _unet(cfg)
    trained = prepare_training(unet, cfg.training)
    assert 0 < trained < sum(p.numel() for p in unet.parameters()) / 10
    selected = {n for n, p in unet.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    drawn: list[int] = []
    plan = _train_with_spy(unet, cfg, drawn)
    for name, p in unet.named_parameters():
        if name in selected:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p.grad is None and getattr(p, "grad_sample", None) is None, name
    assert sum(drawn) == trained * plan.steps_per_round  # noise for the trained ones only


def test_lora_trains_adapters_only_and_merges_into_a_plain_unet():
    cfg = load_config([*SMALL, *LORA])
    unet = _unet(cfg)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before_output = unet(x, torch.tensor([10, 500])).sample
    trained = prepare_training(unet, cfg.training, (0, 0, 1))
    adapters = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert trained == sum(p.numel() for n, p in unet.named_parameters() if n in adapters)
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        assert torch.equal(unet(x, torch.tensor([10, 500])).sample, before_output)

    drawn: list[int] = []
    plan = _train_with_spy(unet, cfg, drawn)
    assert sum(drawn) == trained * plan.steps_per_round  # noise for the adapters only
    for name, p in unet.named_parameters():
        if name not in adapters:
            assert p.grad is None and getattr(p, "grad_sample", None) is None, name

    merged = merge_lora(unet).state_dict()
    assert set(merged) == set(base)  # a plain UNet2DModel again: same keys, loads in diffusers
    targeted = {k for k in base if k.endswith(("conv1.weight", "to_q.weight", "to_v.weight"))}
    assert targeted
    for key in base:
        if key in targeted:
            delta = (merged[key] - base[key]).reshape(base[key].shape[0], -1)
            assert 0 < torch.linalg.matrix_rank(delta) <= cfg.training.lora_rank, key
        else:
            assert torch.equal(merged[key], base[key]), key
    build_unet(cfg.model, 16).load_state_dict(merged)


def test_lora_per_example_gradients_equal_one_example_loop():
    cfg = load_config([*SMALL, *LORA, "training.lora_targets=[conv1,conv2,to_q,to_k,to_v,to_out.0]"])
    unet = _unet(cfg).double()
    prepare_training(unet, cfg.training, (0, 0, 1))
    with torch.no_grad():  # B = 0 would make every gradient of A zero: test a trained adapter
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    diffusion = Diffusion(build_scheduler(cfg.model))
    diffusion.alphas_cumprod = diffusion.alphas_cumprod.double()
    x0 = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    t, eps = diffusion.draw(x0, 2, generator=torch.Generator().manual_seed(1))
    grads, _ = per_sample_gradients(unet, diffusion, x0, t, eps.double())
    assert set(grads) == {n for n, p in unet.named_parameters() if p.requires_grad}
    for i in range(3):
        unet.zero_grad()
        diffusion.per_example_loss(unet_denoiser(unet), x0[i : i + 1], t[i : i + 1], eps[i : i + 1].double()).sum().backward()
        for name, p in unet.named_parameters():
            if p.requires_grad:
                assert p.grad.abs().max() > 0, name
                torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_a_lora_target_that_does_not_exist_is_a_clear_error_and_nothing_changes():
    cfg = load_config([*SMALL, "training.trainable=lora", "training.lora_targets=[conv1,to_qq]"])
    unet = _unet(cfg)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ConfigError, match=r"\['to_qq'\].*to_q"):
        prepare_training(unet, cfg.training)
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    cfg = load_config([*SMALL, "training.trainable=lora", "training.lora_rank=0"])
    with pytest.raises(ConfigError, match="lora_rank"):
        prepare_training(_unet(cfg), cfg.training)


def test_merging_adapters_that_overflow_is_refused():
    cfg = load_config([*SMALL, *LORA])
    unet = _unet(cfg)
    prepare_training(unet, cfg.training, (0, 0, 1))
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if ".lora_B." in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        merge_lora(unet)


def test_a_hospital_with_lora_sends_plain_weights(tmp_path):
    from fedgen.federation.hospital import Hospital, silos_for

    cfg = load_config([*SMALL, *LORA, "data.num_patients=40", "federation.num_hospitals=2", "training.batch_size=8"])
    state = _unet(cfg).state_dict()
    new_state, metrics = Hospital(cfg, silos_for(cfg)[0], str(tmp_path)).train(state, server_round=1)
    assert set(new_state) == set(state) and metrics["steps"] > 0
    changed = {k for k in state if not torch.equal(new_state[k], state[k])}
    assert changed and all(k.endswith(("conv1.weight", "to_q.weight", "to_v.weight")) for k in changed)
