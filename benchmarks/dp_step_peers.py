"""The steps `benchmarks/dp_step.py` times, on one model and one batch (`Bench`): a plain step,
fedgen's DP step, and Opacus's per-sample gradients (`OpacusPeer`) in the same DP step, with the
check that Opacus's per-example gradients are exact (`check_exact`).

Wrapping diffusers' UNet2DModel for Opacus: nothing special. It passes Opacus's ModuleValidator
and `GradSampleModule(strict=True)` (no buffers, no BatchNorm), and the attention (diffusers'
default `AttnProcessor2_0`, scaled_dot_product_attention) has no parameters of its own: its
projections are `nn.Linear` layers, which Opacus hooks like any other. `unet_denoiser(module)` calls
the wrapper as fedgen calls the UNet. Two things are the benchmark's: (1) `loss_reduction="sum"`
on the wrapper and `losses.sum().backward()`, so that `p.grad_sample` is each example's gradient
of its own loss, as `per_sample_gradients` returns it (with "mean", Opacus rescales the output
gradients by the rows it sees, B*K, not by B); the DP optimizer keeps fedgen's
`loss_reduction="mean"` (divide by the expected batch size). (2) With noise multiplicity K > 1 the
UNet's batch is the B*K (example, draw) rows (consecutive per example), and Opacus's layer hooks
see only those rows, so its `grad_sample` has B*K rows; the K rows of each example are summed
before clipping (the per-example loss averages the draws), which is what fedgen's rules do inside.
Each Opacus mode runs on its own deep copy of the UNet (Opacus's hooks stay on the modules they
wrap and would slow the other steps down) with its own optimizer state; the weights start equal.

Exactness: before timing, one (t, eps) draw on the fixed batch goes through fedgen's exact
`per_sample_gradients` (itself tested against a one-example loop) and through each Opacus mode,
with the Opacus copy's weights set to the UNet's. Per parameter, Opacus's per-example gradients
[B, *shape] mismatch when max|opacus - fedgen| > 1e-4 * max(max|fedgen|, max|opacus|); the JSON
names each mismatched parameter (and whether Opacus's values were all zero). A mode that is not
exact is still timed; a mode that raises (an unsupported layer, at wrapping or in the first step)
is reported with its error and left out of the timing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import prepare_module
from opacus.validators import ModuleValidator

from fedgen.config import ExperimentConfig, load_config
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.dp_optimizer import NoisingDPOptimizer
from fedgen.privacy.dp_sgd import make_optimizer
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.privacy.randomness import SecretRandomness

# Any values: a step's cost depends on neither (the accountant hook only records them).
NOISE_MULTIPLIER = 1.0
SAMPLE_RATE = 0.05
# Benchmark mode -> Opacus grad_sample_mode.
OPACUS_MODES = {"opacus_functorch": "functorch", "opacus_hooks": "hooks"}
MODES = ("plain", "dp", *OPACUS_MODES)
# Per-example gradients of one parameter mismatch when their largest difference exceeds this
# fraction of their largest magnitude (two exact float32 computations agree to ~1e-6 of it).
EXACT_RTOL = 1e-4


class OpacusPeer:
    """Opacus's per-sample gradients on its own deep copy of the UNet, wrapped as its PrivacyEngine
    wraps a model for `grad_sample_mode`, with a DP optimizer configured as fedgen's."""

    def __init__(
        self,
        unet: torch.nn.Module,
        grad_sample_mode: str,
        dp_optimizer: Callable[[list[torch.nn.Parameter]], NoisingDPOptimizer],
    ):
        self.unet = copy.deepcopy(unet)
        errors = ModuleValidator.validate(self.unet, strict=False)  # what PrivacyEngine refuses
        if errors:
            raise NotImplementedError(f"Opacus's ModuleValidator: {errors}")
        # loss_reduction="sum": p.grad_sample is each example's gradient of its own loss (see the
        # module docstring); strict=True (PrivacyEngine's default): refuse layers with buffers.
        self.module = prepare_module(
            self.unet, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="sum",
            strict=True,
        )
        self.named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        self.optimizer = dp_optimizer([p for _, p in self.named])

    def grad_samples(
        self, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> None:
        """Forward and backward of the summed per-example loss, leaving `p.grad_sample` [B, *shape]
        on every trainable parameter. x0 [B,C,H,W]; t [B,K]; eps [B,K,C,H,W]."""
        losses = diffusion.per_example_loss(unet_denoiser(self.module), x0, t, eps)  # [B]
        losses.sum().backward()
        b, k = t.shape
        for name, p in self.named:
            gs = p.grad_sample  # type: ignore[attr-defined]
            if not isinstance(gs, torch.Tensor):  # None: not computed; a list: accumulated
                raise RuntimeError(f"Opacus left no single grad_sample tensor for {name}: {type(gs)}")
            if k > 1:  # the UNet's rows are (example, draw) pairs: sum each example's K rows
                p.grad_sample = gs.reshape(b, k, *p.shape).sum(dim=1)  # type: ignore[attr-defined]


class Bench:
    """One model, one batch, and a step function per mode. plain and dp share the UNet's weights
    but have their own optimizer state (Adam moments), as two separate training runs would; each
    Opacus mode has its own copy of the UNet (same initial weights). An Opacus mode that cannot
    wrap the UNet is left out, its error in `errors`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        batch: int,
        device: torch.device,
        seed: int = 0,
        modes: tuple[str, ...] = MODES,
    ):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.unet = build_unet(cfg.model, cfg.data.image_size).to(device)
        self.unet.train()
        self.diffusion = Diffusion(build_scheduler(cfg.model))
        self.denoiser = unet_denoiser(self.unet)
        self.k = cfg.training.noise_multiplicity
        self.batch = batch
        size = cfg.data.image_size
        self.x0 = (torch.rand(batch, 1, size, size) * 2 - 1).to(device)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.plain_opt = make_optimizer(cfg, params)
        self.dp_opt = self._dp_optimizer(params)
        self.peers: dict[str, OpacusPeer] = {}
        self.errors: dict[str, str] = {}
        for mode in modes:
            if mode not in OPACUS_MODES:
                continue
            try:
                self.peers[mode] = OpacusPeer(self.unet, OPACUS_MODES[mode], self._dp_optimizer)
            except Exception as e:  # an unsupported layer: reported, not fatal
                self.errors[mode] = f"{type(e).__name__}: {e}"
        self.modes = tuple(m for m in modes if m not in self.errors)

    def _dp_optimizer(self, params: list[torch.nn.Parameter]) -> NoisingDPOptimizer:
        optimizer = NoisingDPOptimizer(
            make_optimizer(self.cfg, params),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=self.cfg.privacy.max_grad_norm,
            expected_batch_size=self.batch,
            loss_reduction="mean",
            randomness=SecretRandomness(),  # what training uses: the OS's CSPRNG, not a seed
        )
        accountant = RDPAccountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=SAMPLE_RATE))
        return optimizer

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (t [B,K], eps [B,K,C,H,W]) for the fixed batch."""
        t, eps = self.diffusion.draw(self.x0.cpu(), self.k, generator=self.gen)
        return t.to(self.device), eps.to(self.device)

    def plain_step(self) -> None:
        t, eps = self.draw()
        self.plain_opt.zero_grad(set_to_none=True)
        losses = self.diffusion.per_example_loss(self.denoiser, self.x0, t, eps)
        losses.mean().backward()
        self.plain_opt.step()
        self._sync()

    def dp_step(self) -> None:
        t, eps = self.draw()
        self.dp_opt.zero_grad(set_to_none=True)
        grads, _ = per_sample_gradients(self.unet, self.diffusion, self.x0, t, eps)
        for name, p in self.named:
            p.grad_sample = grads[name]
        self.dp_opt.pre_step()
        self.dp_opt.original_optimizer.step()
        self._sync()

    def opacus_step(self, mode: str) -> None:
        peer = self.peers[mode]
        t, eps = self.draw()
        peer.optimizer.zero_grad(set_to_none=True)  # also clears p.grad_sample
        peer.grad_samples(self.diffusion, self.x0, t, eps)
        peer.optimizer.pre_step()
        peer.optimizer.original_optimizer.step()
        self._sync()

    def step(self, mode: str) -> None:
        if mode == "plain":
            self.plain_step()
        elif mode == "dp":
            self.dp_step()
        else:
            self.opacus_step(mode)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compare_grad_samples(
    reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor | None]
) -> dict:
    """Per-parameter comparison of per-example gradients {name: [B, *shape]} with the exact ones.
    A parameter mismatches when its largest difference exceeds EXACT_RTOL times the larger of the
    two's largest magnitudes, or when the candidate has none or another shape."""
    mismatched: dict[str, dict] = {}
    worst = 0.0  # the largest relative difference among the parameters that match
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            mismatched[name] = {"problem": "missing" if got is None else f"shape {list(got.shape)}"}
            continue
        diff = (got - ref).abs().max().item()
        scale = max(ref.abs().max().item(), got.abs().max().item())
        if diff > EXACT_RTOL * scale:
            mismatched[name] = {
                "max_abs_diff": diff,
                "scale": scale,
                "opacus_all_zero": bool((got == 0).all()),
            }
        elif scale > 0:
            worst = max(worst, diff / scale)
    return {
        "compared_parameters": len(reference),
        "mismatched_parameters": len(mismatched),
        "names": sorted(mismatched),
        "details": mismatched,
        "rtol": EXACT_RTOL,
        "max_relative_diff_of_matching": worst,
    }


def check_exact(bench: Bench) -> dict[str, dict]:
    """{Opacus mode: compare_grad_samples(...) or {"error": ...}} on one (t, eps) draw of the batch,
    each Opacus copy holding the UNet's weights. A mode whose step raises is left out of timing."""
    report: dict[str, dict] = {mode: {"error": err} for mode, err in bench.errors.items()}
    if not bench.peers:
        return report
    t, eps = bench.draw()
    reference, _ = per_sample_gradients(bench.unet, bench.diffusion, bench.x0, t, eps)
    for mode, peer in list(bench.peers.items()):
        peer.unet.load_state_dict(bench.unet.state_dict())
        peer.optimizer.zero_grad(set_to_none=True)
        try:
            peer.grad_samples(bench.diffusion, bench.x0, t, eps)
        except Exception as e:  # an unsupported layer surfaces in the first backward pass
            report[mode] = {"error": f"{type(e).__name__}: {e}"}
            del bench.peers[mode]
            bench.modes = tuple(m for m in bench.modes if m != mode)
            continue
        got = {name: p.grad_sample for name, p in peer.named}  # type: ignore[attr-defined]
        report[mode] = compare_grad_samples({n: g.detach() for n, g in reference.items()}, got)
        peer.optimizer.zero_grad(set_to_none=True)
    return report


def config_for(
    model: str, batch: int, image_size: int | None = None, noise_multiplicity: int | None = None
) -> ExperimentConfig:
    overrides = [f"model={model}", f"training.batch_size={batch}"]
    if image_size is not None:
        overrides.append(f"data.image_size={image_size}")
    if noise_multiplicity is not None:
        overrides.append(f"training.noise_multiplicity={noise_multiplicity}")
    return load_config(overrides)
