"""fedgen's DP optimizer clips, sums, noises and scales as Opacus's own DPOptimizer does."""

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedgen.privacy.dp_optimizer import PACKED_BELOW, NoisingDPOptimizer
from fedgen.privacy.randomness import SecretRandomness

# Small (packed together) and large (on their own) parameters, interleaved.
SHAPES = [(7,), (PACKED_BELOW + 3,), (3, 5), (2, 40, 60), (1,)]


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]


def _grads(batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different norms: some clipped, some not.
    scale = torch.logspace(-2, 1, batch) if batch else torch.zeros(0)
    return [torch.randn((batch, *s), generator=gen) * scale.view(-1, *[1] * len(s)) for s in SHAPES]


def _step(optimizer, params, chunks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    optimizer.zero_grad(set_to_none=True)
    for i, grads in enumerate(chunks):
        for p, g in zip(params, grads, strict=True):
            p.grad_sample = g.clone()
        if i < len(chunks) - 1:
            optimizer.signal_skip_step(do_skip=True)
        optimizer.pre_step()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("batches", [[6], [4, 3], [0]])
def test_clipped_sums_match_opacus(batches):
    chunks = [_grads(b, seed) for seed, b in enumerate(batches)]
    ours_params, theirs_params = _params(), _params()
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.3, "expected_batch_size": 5, "loss_reduction": "mean"}
    ours = NoisingDPOptimizer(torch.optim.SGD(ours_params, lr=1.0), randomness=SecretRandomness(), **kw)
    theirs = DPOptimizer(torch.optim.SGD(theirs_params, lr=1.0), **kw)
    got, want = _step(ours, ours_params, chunks), _step(theirs, theirs_params, chunks)
    for g, w, p in zip(got, want, ours_params, strict=True):
        assert g.shape == p.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    if batches != [0]:
        assert any(w.abs().sum() > 0 for w in want)  # the comparison is not between zeros


def test_noise_covers_every_coordinate_once_at_the_calibrated_scale():
    params = _params()
    sigma, clip, batch = 2.0, 0.5, 4
    optimizer = NoisingDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                                   expected_batch_size=batch, loss_reduction="mean", randomness=SecretRandomness())
    grads = _step(optimizer, params, [[torch.zeros(batch, *s) for s in SHAPES]])
    noise = torch.cat([g.flatten() for g in grads]) * batch  # zero gradients: the noise, scaled back
    assert noise.numel() == sum(p.numel() for p in params)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.05)
    # One draw split across parameters: each parameter starts at its own part of it.
    assert len({g.flatten()[0].item() for g in grads}) == len(grads)
