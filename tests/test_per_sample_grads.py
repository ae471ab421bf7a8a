"""Per-example gradients must equal a one-example-at-a-time loop, for every UNet parameter."""

import pytest
import torch

from fedgen.config import ModelConfig
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.per_sample_grads import _vmap_gradients, per_sample_gradients

# Every block type the presets use: plain and attention down/up blocks, mid-block attention.
ATTENTION_EVERYWHERE = ModelConfig(
    name="attn-test",
    block_out_channels=[8, 16],
    down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"],
    layers_per_block=1,
    mid_block_attention=True,
    attention_head_dim=4,
    norm_num_groups=4,
)


def _setup(model_cfg: ModelConfig, batch: int, draws: int, size: int = 16):
    torch.manual_seed(0)
    unet = build_unet(model_cfg, size).double()
    diffusion = Diffusion(build_scheduler(model_cfg))
    diffusion.alphas_cumprod = diffusion.alphas_cumprod.double()
    x0 = torch.rand(batch, 1, size, size, dtype=torch.float64) * 2 - 1
    t, eps = diffusion.draw(x0, draws, generator=torch.Generator().manual_seed(1))
    return unet, diffusion, x0, t, eps.double()


def _loop_gradients(unet, diffusion, x0, t, eps):
    """Reference: backpropagate each example's own loss, one at a time."""
    per_example = []
    for i in range(len(x0)):
        unet.zero_grad()
        loss = diffusion.per_example_loss(unet_denoiser(unet), x0[i : i + 1], t[i : i + 1], eps[i : i + 1])
        loss.sum().backward()
        per_example.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    return per_example


METHODS = {"layer-rules": per_sample_gradients, "vmap": _vmap_gradients}


@pytest.mark.parametrize(
    "model_cfg", [ModelConfig(), ATTENTION_EVERYWHERE], ids=["tiny-preset", "attention-blocks"]
)
@pytest.mark.parametrize("draws,batch", [(1, 3), (3, 3), (2, 1)], ids=["K1-B3", "K3-B3", "K2-B1"])
@pytest.mark.parametrize("method", list(METHODS))
def test_per_sample_gradients_equal_one_example_loop(model_cfg, draws, batch, method):
    unet, diffusion, x0, t, eps = _setup(model_cfg, batch=batch, draws=draws)
    grads, losses = METHODS[method](unet, diffusion, x0, t, eps)
    reference = _loop_gradients(unet, diffusion, x0, t, eps)
    names = [n for n, _ in unet.named_parameters()]
    assert set(grads) == set(names), "a trainable parameter has no per-sample gradient"
    for i, ref in enumerate(reference):
        scale = max(g.abs().max().item() for g in ref.values())
        for name in names:
            assert grads[name][i].shape == ref[name].shape
            # Absolute tolerance on the gradient's scale: some gradients (e.g. attention key
            # biases, to which softmax is invariant) are exactly zero up to rounding.
            torch.testing.assert_close(grads[name][i], ref[name], rtol=1e-7, atol=1e-9 * scale, msg=name)
            if ref[name].abs().max() > 1e-6 * scale:
                assert grads[name][i].abs().max() > 0, f"{name}: zero per-sample gradient"
    with torch.no_grad():
        expected = diffusion.per_example_loss(unet_denoiser(unet), x0, t, eps)
    torch.testing.assert_close(losses, expected)


def test_noise_multiplicity_gradient_is_gradient_of_averaged_loss():
    """With K draws, each example's gradient is the gradient of its K-averaged loss."""
    unet, diffusion, x0, t, eps = _setup(ModelConfig(), batch=2, draws=4)
    grads, _ = per_sample_gradients(unet, diffusion, x0, t, eps)
    for i in range(2):
        unet.zero_grad()
        draw_losses = [
            diffusion.per_example_loss(unet_denoiser(unet), x0[i : i + 1], t[i : i + 1, k : k + 1], eps[i : i + 1, k : k + 1])
            for k in range(4)
        ]
        torch.stack(draw_losses).mean().backward()
        for name, p in unet.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_empty_batch_gives_zero_length_gradients():
    unet, diffusion, x0, t, eps = _setup(ModelConfig(), batch=2, draws=1)
    grads, losses = per_sample_gradients(unet, diffusion, x0[:0], t[:0], eps[:0])
    assert losses.shape == (0,)
    for name, p in unet.named_parameters():
        assert grads[name].shape == (0, *p.shape)
