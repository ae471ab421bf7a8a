"""Exact per-example gradients of the denoising loss, for DP-SGD's per-example clipping.

Why not Opacus's own grad samplers: with diffusers' UNet, the default `hooks` mode returns
per-example gradients of exactly zero for the conv layers fed by attention blocks (their output is
channels_last and Opacus's conv unfold assumes the standard layout), and `ghost` clipping then
uses wrong norms, which silently voids the privacy guarantee.

Two exact methods, both checked against a one-example-at-a-time loop (tests/test_per_sample_grads):

- Layer rules (used whenever every trainable parameter sits in an `nn.Conv2d`, `nn.Linear` or
  `nn.GroupNorm`, as in every UNet2DModel preset): one ordinary batched forward pass, in which
  each such layer's input is kept; one backward pass of the summed loss that computes input
  gradients only (no summed weight gradients), during which each layer's per-example weight
  gradients are computed from its (input, output gradient) pair by a real kernel: for a
  convolution, the weight gradient of the same convolution with the examples folded into its
  groups (or one matrix product per kernel tap); for a linear layer, a batched matrix product;
  for a group norm, the fused group-norm weight gradient with each example's groups as separate
  channels. Whatever the tensors' memory layout (channels_last included), these are ordinary
  PyTorch ops on the actual tensors. It relies on the network treating examples independently
  (GroupNorm, no BatchNorm), which holds for UNet2DModel: then the gradient of the summed loss
  with respect to example i's rows of a layer output is the gradient of example i's own loss.
- torch.func `vmap(grad(...))` over a `functional_call` (any other network): differentiates the
  real forward pass example by example, whatever the layer. On the tiny preset (batch 32, CPU)
  a whole DP step took about 1.3x as long with it as with the layer rules: vmap has no batching
  rule for CPU flash attention (it loops over the examples there) and batches the many small ops
  of a UNet less well. `benchmarks/dp_step.py` measures the DP step against the plain one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedgen.diffusion import Diffusion, unet_denoiser

# A rule maps (layer, its input [B*K,...], gradient w.r.t. its output [B*K,...], B) to
# {parameter name: per-example gradient [B, *param.shape]}, the K rows of an example summed; a
# group norm's rule also takes the statistics its forward pass saved (mean, rstd), where found.
# (Callable[..., ...] because each rule takes its own layer type.)
LayerRule = Callable[..., dict[str, torch.Tensor]]


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
    `chunk_size` bounds the examples vmap processes at once; the layer-rule method (see the module
    docstring) does not use it.
    """
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if x0.shape[0] == 0:
        empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return empty, x0.new_zeros(0)
    layers = _trainable_layers(unet)
    if all(_has_rule(layer) for layer in layers):
        return _layer_rule_gradients(unet, diffusion, x0, t, eps, layers, params)
    return _vmap_gradients(unet, diffusion, x0, t, eps, chunk_size)


def _trainable_layers(unet: nn.Module) -> list[nn.Module]:
    return [
        m for m in unet.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _has_rule(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d) and (
        layer.padding_mode != "zeros" or isinstance(layer.padding, str)
    ):
        return False  # the rule assumes the layer zero-pads by integer amounts
    return type(layer) in LAYER_RULES


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output's gradient to `consume`.

    Its second input, `anchor`, is a scalar leaf shared by all taps: differentiating the loss with
    respect to the anchor alone makes autograd run every tap (each one leads to the anchor) and
    every input gradient on the way, but no weight gradient (no weight leads to the anchor).
    """

    @staticmethod
    def forward(ctx, output, anchor, consume):
        ctx.consume = consume
        ctx.anchor_grad = anchor.new_zeros(())
        return output

    @staticmethod
    def backward(ctx, grad_output):
        ctx.consume(grad_output)
        return grad_output, ctx.anchor_grad, None


def _layer_rule_gradients(
    unet: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    layers: list[nn.Module],
    params: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The layer-rule method: one batched forward pass with a tap on every trainable layer's
    output, one backward pass in which each tap applies its layer's rule as soon as the gradient
    with respect to that output is complete (so that gradient can be freed right after)."""
    b = x0.shape[0]
    # Key by the parameter object, so a parameter shared by two layers gets both contributions.
    name_of = {id(p): n for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    anchor = torch.zeros((), device=x0.device, requires_grad=True)

    def apply_rule(layer: nn.Module, x: torch.Tensor, x_version: int, gy: torch.Tensor, saved: dict) -> None:
        if x._version != x_version:
            raise RuntimeError(
                f"the input of {type(layer).__name__} was modified in place after the layer ran; "
                "its per-example gradients cannot be computed from it"
            )
        for pname, g in LAYER_RULES[type(layer)](layer, x, gy, b, **saved).items():
            name = name_of.get(id(getattr(layer, pname)))
            if name is None:  # a frozen parameter of a trainable layer
                continue
            grads[name] = grads[name] + g if name in grads else g

    def tap(layer, args, kwargs, output):
        # A layer may run more than once: each call gets its own tap and adds its own share.
        x = (args[0] if args else kwargs["input"]).detach()  # shares the input's version counter
        version = x._version
        saved = _saved_group_norm_statistics(output) if type(layer) is nn.GroupNorm else {}
        return _Tap.apply(output, anchor, lambda gy: apply_rule(layer, x, version, gy, saved))

    handles = [layer.register_forward_hook(tap, with_kwargs=True) for layer in layers]
    try:
        with torch.enable_grad():
            losses = diffusion.per_example_loss(unet_denoiser(unet), x0, t, eps)  # [B]
    finally:
        for handle in handles:
            handle.remove()
    # The per-example losses are independent, so the gradient of their sum with respect to
    # example i's rows of a layer output is the gradient of example i's own loss.
    if losses.requires_grad:  # False only when no layer has a trainable parameter
        torch.autograd.grad(losses.sum(), anchor, allow_unused=True)
    for name, p in params.items():
        if name not in grads:  # a layer that did not run, or whose output the loss ignores
            grads[name] = p.new_zeros((b, *p.shape))
    return grads, losses.detach()


def _conv2d_rule(
    layer: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, b: int
) -> dict[str, torch.Tensor]:
    n, c, h, w = x.shape
    k = n // b  # rows of one example (its K draws), consecutive in the batch
    o, ho, wo = gy.shape[1:]
    kh, kw = layer.kernel_size
    simple = k == 1 and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1)
    same_padding = kh % 2 == 1 and kw % 2 == 1 and layer.padding == (kh // 2, kw // 2)
    out: dict[str, torch.Tensor] = {}
    if simple and layer.kernel_size == (1, 1) and layer.padding == (0, 0):
        # 1x1 convolution: a matrix product per example (faster than a grouped convolution).
        weight = torch.bmm(gy.reshape(b, o, -1), x.reshape(b, c, -1).transpose(1, 2))
    elif simple and same_padding and min(c, o) < 8:
        # Few input or output channels (conv_in, conv_out), where oneDNN's grouped weight
        # gradient is slow: one matrix product per kernel tap, x's taps read in place. Flattened
        # with the padded row width wp, tap (i, j) of output position h*wp + w is input position
        # h*wp + w + i*wp + j: a slice. Output gradients are zero-padded to width wp, so the
        # wrapped-around positions add 0.
        ph, pw = kh // 2, kw // 2
        wp = w + 2 * pw
        length = h * wp
        xp = F.pad(x, (pw, pw, ph, ph + 1)).reshape(b, c, -1)  # one spare row for the last tap
        gyp = F.pad(gy, (0, 2 * pw)).reshape(b, o, length).transpose(1, 2)  # [B, L, O]
        taps = x.new_empty(kh * kw, b, c, o)
        for i in range(kh):
            for j in range(kw):
                start = i * wp + j
                torch.bmm(xp[:, :, start : start + length], gyp, out=taps[i * kw + j])
        weight = taps.permute(1, 3, 2, 0).contiguous()  # [B, O, C, kh*kw]
    else:
        # The weight gradient of a convolution whose groups are the examples: example i's input
        # channels meet only example i's output gradients. Its batch dimension (the K draws)
        # is summed over, as the per-example loss averages them.
        xs = x.reshape(b, k, c, h, w).transpose(0, 1).reshape(k, b * c, h, w)
        gys = gy.reshape(b, k, o, ho, wo).transpose(0, 1).reshape(k, b * o, ho, wo)
        weight_shape = (b * o, c // layer.groups, *layer.kernel_size)
        weight = torch.ops.aten.convolution_backward(
            gys, xs, x.new_empty(weight_shape), None, layer.stride, layer.padding,
            layer.dilation, False, (0, 0), b * layer.groups, (False, True, False),
        )[1]
    out["weight"] = weight.reshape(b, *layer.weight.shape)
    if layer.bias is not None:
        out["bias"] = gy.reshape(b, k, o, ho * wo).sum(dim=(1, 3))
    return out


def _linear_rule(
    layer: nn.Linear, x: torch.Tensor, gy: torch.Tensor, b: int
) -> dict[str, torch.Tensor]:
    # Rows [B*K, ..., features]: an example's K draws and positions (tokens) are summed over.
    xs = x.reshape(b, -1, x.shape[-1])
    gys = gy.reshape(b, -1, gy.shape[-1])
    out = {"weight": torch.bmm(gys.transpose(1, 2), xs)}
    if layer.bias is not None:
        out["bias"] = gys.sum(dim=1)
    return out


def _saved_group_norm_statistics(output: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-(row, group) mean and 1/std [N, G] that the forward pass saved for its own backward
    (so the rule need not compute them again), or {} where the layer ran some other kernel."""
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return {}
    return {"mean": node._saved_result1, "rstd": node._saved_result2}


def _group_norm_rule(
    layer: nn.GroupNorm, x: torch.Tensor, gy: torch.Tensor, b: int,
    mean: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    # y = x_hat * weight + bias per channel, x_hat the input [B*K, C, *] normalised per (row,
    # group). Viewed as one row of B*K*C channels in B*K*G groups, the normalisation is the same,
    # and the fused kernels' weight and bias gradients are then per row: sum(gy * x_hat) and
    # sum(gy) over positions. The K rows of an example are then summed.
    n, c = x.shape[:2]
    positions = x[0, 0].numel()
    groups = n * layer.num_groups
    # The fused kernels want both in the standard layout (channels_last ones come from attention).
    xs = x.reshape(1, n * c, positions).contiguous()
    if mean is None or rstd is None:
        _, mean, rstd = torch.ops.aten.native_group_norm(
            xs, None, None, 1, n * c, positions, groups, layer.eps
        )
    else:  # the forward pass's, per (row, group): the same numbers in the same order
        mean, rstd = mean.reshape(1, groups), rstd.reshape(1, groups)
    ones = x.new_ones(n * c)  # the layer's own weight only scales the input gradient (not asked)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        gy.reshape(1, n * c, positions).contiguous(), xs, mean, rstd, ones, 1, n * c, positions,
        groups,
        (False, True, True),
    )
    out = {}
    if layer.weight is not None:
        out["weight"] = weight.reshape(b, -1, c).sum(dim=1)
    if layer.bias is not None:
        out["bias"] = bias.reshape(b, -1, c).sum(dim=1)
    return out


# Exact types: a subclass may change the forward pass that these rules differentiate.
LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Conv2d: _conv2d_rule,
    nn.Linear: _linear_rule,
    nn.GroupNorm: _group_norm_rule,
}


def _vmap_gradients(
    unet: nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The vmap method, for any network. Same arguments and result as `per_sample_gradients`."""
    params = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in unet.named_buffers()}

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
