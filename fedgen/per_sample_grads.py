"""Exact per-example gradients of the denoising loss, for DP-SGD's per-example clipping.

Why not Opacus's own grad samplers: with diffusers' UNet, the default `hooks` mode returns
per-example gradients of exactly zero for the conv layers fed by attention blocks (their output is
channels_last and Opacus's conv unfold assumes the standard layout), and `ghost` clipping then
uses wrong norms, which silently voids the privacy guarantee. torch.func's `vmap(grad(...))` over a
`functional_call` differentiates the real forward pass example by example: exact for every
parameter, whatever the layer, and the fastest exact option measured on this stack.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from fedgen.diffusion import Diffusion


def per_sample_gradients(
    unet: torch.nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each example's loss (averaged over its K draws) w.r.t. every trainable parameter.

    x0 [B,C,H,W]; t [B,K]; eps [B,K,C,H,W]. Returns ({name: [B, *param.shape]}, losses [B]).
    An empty batch (B = 0, which Poisson sampling produces) gives zero-length gradients, so the
    DP optimizer still takes its noisy step: skipping it would reveal that the batch was empty.
    """
    params = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in unet.named_buffers()}
    if x0.shape[0] == 0:
        empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return empty, x0.new_zeros(0)

    # Indexing alphas_cumprod[t] inside vmap fails (it needs .item()): gather outside, pass in.
    sqrt_abar, sqrt_one_minus_abar = diffusion.coefficients(t)  # [B,K]

    def example_loss(p, x0_i, t_i, eps_i, a_i, b_i):
        # One example: x0_i [C,H,W], its K draws t_i [K], eps_i [K,C,H,W].
        x0_rep = x0_i.unsqueeze(0).expand(t_i.shape[0], *x0_i.shape)
        x_t = Diffusion.q_sample_with(x0_rep, eps_i, a_i, b_i)
        eps_pred = functional_call(unet, (p, buffers), (x_t, t_i), {"return_dict": False})[0]
        loss = ((eps_pred - eps_i) ** 2).mean()
        return loss, loss.detach()

    grads, losses = vmap(
        grad(example_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0), chunk_size=chunk_size
    )(params, x0, t, eps, sqrt_abar, sqrt_one_minus_abar)
    return grads, losses
