"""Gradient inversion of one hospital's update: the curious coordinator reconstructs training images.

Threat model: the coordinator holds the global weights it sent, the weights a hospital returned,
the noise schedule, and what the run's config says of the hospital's local training (optimizer,
learning rate, steps, batch size, noise multiplicity K). Nothing else: not the images, not which
ones were sampled, not the (timestep, noise) draws of the diffusion loss, not the DP noise.

One plain SGD step (the easy case): the update is -lr times the batch's gradient, the time MLP
gives each draw's timestep away, and L-BFGS matches the update itself (`_invert_one_sgd_step`).

Otherwise (Geiping et al. 2020, "Inverting Gradients", for diffusion models as in GIDM+, Huang
et al. 2024): optimise candidate images x0 [B,1,H,W] together with the unknown timesteps (a
continuous relaxation t in [0, T-1], the schedule interpolated) and noise eps of every simulated
local step, so that the update the hospital's optimizer would have made from the global weights on
them points the way the observed one does: 1 - cosine(simulated delta, observed delta), plus a
total-variation prior on x0. The simulated local steps are differentiated through
(`torch.func.functional_call`, `create_graph`).

Adam: the first step from a fresh state moves every weight by about -lr * sign(gradient), with no
useful derivative; the simulation divides by sqrt(v_hat) + `adam_smoothing` * rms(grad) per tensor
instead (a soft sign), a relaxation the observed update never needed.

Scoring (`score`) uses the hospital's images and is never fed back into the optimisation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from fedgen.diffusion import Diffusion

StateDict = dict[str, torch.Tensor]
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class LocalRecipe:
    """What the coordinator knows of a hospital's local training (the run's config and metrics)."""

    optimizer: str  # sgd | adam
    learning_rate: float
    steps: int  # local optimizer steps in the round
    batch_size: int  # expected images per step
    noise_multiplicity: int = 1  # K (timestep, noise) draws per image and step


@dataclass(frozen=True)
class InversionSettings:
    images: int = 0  # candidate images B (0: the recipe's batch size)
    iterations: int = 300  # for the best start, after the warm-ups (one SGD step: per start, L-BFGS)
    restarts: int = 8  # starts with timesteps spread over [0, T) (one SGD step: starts at most)
    warmup: int = 40  # iterations of each start before the best is chosen (one SGD step: unused)
    step_size: float = 0.05  # Adam on the candidates
    tv_weight: float = 1e-3  # total-variation prior on x0 (Inverting Gradients)
    adam_smoothing: float = 0.1  # soft sign for a simulated Adam step (see the module docstring)
    seed: int = 0  # the candidates' initialisation


@dataclass(frozen=True)
class Inversion:
    """Reconstructions x0 [B,1,H,W] in [-1, 1], their timesteps [S,B,K] and the loss per iteration
    (one SGD step: the relative squared distance after every 10 L-BFGS iterations of the start kept)."""

    images: torch.Tensor
    timesteps: torch.Tensor
    losses: list[float]


def weight_delta(before: StateDict, after: StateDict) -> StateDict:
    """after - before for every floating-point tensor (the update the coordinator observed)."""
    return {k: (after[k].float() - before[k].float()) for k, v in before.items() if v.is_floating_point()}


def _abar(diffusion: Diffusion, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar at continuous timesteps t (any shape): the schedule linearly interpolated."""
    table = diffusion.alphas_cumprod.to(t.device)
    low = t.detach().floor().clamp(0, len(table) - 2).long()
    frac = t - low
    return table[low] * (1 - frac) + table[low + 1] * frac


def simulate_update(unet: torch.nn.Module, start: StateDict, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor, recipe: LocalRecipe, adam_smoothing: float = 0.1) -> StateDict:
    """The weight change of `recipe.steps` local steps from `start` on x0 [B,C,H,W], step s using
    timesteps t[s] [B,K] (float) and noise eps[s] [B,K,C,H,W]: a differentiable graph in all three.
    Every step takes the whole candidate batch (the real batches are secret Poisson samples)."""
    names = [n for n, p in unet.named_parameters()]
    params = {n: start[n].detach().clone().requires_grad_(True) for n in names}
    weights = dict(params)
    buffers = {n: b for n, b in unet.named_buffers()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    b, k = t.shape[1:]
    for s in range(recipe.steps):
        x_rep = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
        abar = _abar(diffusion, t[s].reshape(-1)).reshape(-1, 1, 1, 1)
        noise = eps[s].reshape(b * k, *x0.shape[1:])
        x_t = abar.sqrt() * x_rep + (1 - abar).sqrt() * noise
        pred = functional_call(unet, {**weights, **buffers}, (x_t, t[s].reshape(-1)), {"return_dict": False})[0]
        loss = ((pred - noise) ** 2).mean()  # the batch mean of the per-example loss
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True, allow_unused=True)
        new = {}
        for (n, w), g in zip(weights.items(), grads):
            if g is None:
                new[n] = w
                continue
            if recipe.optimizer == "sgd":
                new[n] = w - recipe.learning_rate * g
            else:  # torch.optim.Adam's defaults, with a smoothed denominator
                m[n] = 0.9 * m[n] + 0.1 * g
                v[n] = 0.999 * v[n] + 0.001 * g * g
                m_hat, v_hat = m[n] / (1 - 0.9 ** (s + 1)), v[n] / (1 - 0.999 ** (s + 1))
                floor = adam_smoothing * v_hat.mean().sqrt() + 1e-12
                new[n] = w - recipe.learning_rate * m_hat / ((v_hat + 1e-24).sqrt() + floor)
        weights = new
    return {n: weights[n] - params[n] for n in names}


def timestep_guess(unet: torch.nn.Module, observed: StateDict, last: int, count: int) -> torch.Tensor | None:
    """The `count` timesteps whose embeddings best span the rows of the observed update of the
    time MLP's first linear layer, or None when the network has none. Its weight gradient is
    sum_j g_j emb(t_j)^T over the batch's draws (g_j its bias gradient), so one SGD step on one
    draw reveals emb(t) exactly (Phong et al. 2017 for a linear layer's input) and a few draws
    span a subspace holding theirs; several steps blur it. A start, not a constraint."""
    weight = observed.get("time_embedding.linear_1.weight")
    project = getattr(unet, "time_proj", None)
    if weight is None or project is None or weight.ndim != 2:
        return None
    with torch.no_grad():
        grid = torch.arange(last + 1, dtype=torch.float32)
        emb = project(grid).float()  # [T, D]
        if emb.shape[1] != weight.shape[1]:
            return None
        rank = min(count, *weight.shape)
        basis = torch.linalg.svd(weight.double(), full_matrices=False).Vh[:rank].float()  # [rank, D]
        fit = ((emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ basis.T).norm(dim=1)  # [T] in [0, 1]
        picked: list[int] = []
        spacing = max(1, (last + 1) // (8 * count))  # one pick per peak of the fit
        for t in torch.argsort(fit, descending=True).tolist():
            if all(abs(t - p) >= spacing for p in picked):
                picked.append(t)
            if len(picked) == count:
                break
    return torch.tensor(picked, dtype=torch.float32)


def _cosine_distance(sim: StateDict, observed: StateDict) -> torch.Tensor:
    dot = torch.stack([(sim[n] * observed[n]).sum() for n in sim]).sum()
    norm_sim = torch.stack([(sim[n] ** 2).sum() for n in sim]).sum().sqrt()
    norm_obs = torch.stack([(observed[n] ** 2).sum() for n in sim]).sum().sqrt()
    return 1 - dot / (norm_sim * norm_obs + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of x [B,C,H,W]."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(unet: torch.nn.Module, before: StateDict, after: StateDict, diffusion: Diffusion, recipe: LocalRecipe,
           image_shape: tuple[int, int, int], settings: InversionSettings = InversionSettings(),
           progress: bool = True) -> Inversion:
    """Reconstruct the images behind the update `before` -> `after` of `unet`'s weights (the
    network only lends its architecture; its own weights are not used). image_shape (C,H,W)."""
    if recipe.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {recipe.optimizer!r}")
    if recipe.steps < 1 or recipe.batch_size < 1:
        raise ValueError(f"the recipe needs >= 1 step and batch size, got {recipe}")
    observed = {n: d.detach() for n, d in weight_delta(before, after).items()
                if n in dict(unet.named_parameters())}
    if not any(float(d.abs().sum()) > 0 for d in observed.values()):
        raise ValueError("the observed update is zero: nothing to invert")
    gen = torch.Generator().manual_seed(settings.seed)
    b, k, steps = settings.images or recipe.batch_size, recipe.noise_multiplicity, recipe.steps
    last = diffusion.num_timesteps - 1
    if recipe.optimizer == "sgd" and steps == 1:
        return _invert_one_sgd_step(unet, before, observed, diffusion, recipe, image_shape, settings, (b, k), gen,
                                    progress)
    total = (settings.restarts + 1) * settings.warmup + settings.iterations
    bar = tqdm(total=total, desc="inverting the update", disable=not progress, leave=False)

    def objective(x0: torch.Tensor, eps: torch.Tensor, t_logit: torch.Tensor) -> torch.Tensor:
        # The fused attention kernels have no second derivative; the plain one computes the same.
        with sdpa_kernel(SDPBackend.MATH):
            t = torch.sigmoid(t_logit) * last
            sim = simulate_update(unet, before, diffusion, x0, t, eps, recipe, settings.adam_smoothing)
            return _cosine_distance(sim, observed) + settings.tv_weight * total_variation(x0)

    # The loss is far from convex in the timesteps (sinusoidal embeddings): short runs from
    # timesteps spread over [0, T) (restart r starts every candidate in the r-th stratum), then
    # the best of them runs to the end.
    # One more start from the timesteps the time MLP's update points at (`timestep_guess`).
    guess = timestep_guess(unet, observed, last, steps * b * k)
    candidates = []
    for r in range(settings.restarts + (guess is not None)):
        x0 = 0.1 * torch.randn((b, *image_shape), generator=gen)
        eps = torch.randn((steps, b, k, *image_shape), generator=gen)
        if r < settings.restarts:
            u = (r + torch.rand((steps, b, k), generator=gen)) / settings.restarts
        else:
            assert guess is not None
            picks = guess[torch.arange(steps * b * k) % len(guess)]
            u = ((picks + 0.5) / (last + 1)).reshape(steps, b, k)
        t_logit = torch.logit(u.clamp(1e-3, 1 - 1e-3))
        losses = _descend(objective, [x0, eps, t_logit], settings.warmup, settings.step_size, bar)
        candidates.append((losses[-1] if losses else 0.0, [x0, eps, t_logit], losses))
    _, best, history = min(candidates, key=lambda c: c[0])
    history = history + _descend(objective, best, settings.iterations, settings.step_size, bar, decay=True)
    bar.close()
    x0, _, t_logit = best
    return Inversion(x0.detach().clone(), (torch.sigmoid(t_logit) * last).detach(), history)


def _invert_one_sgd_step(unet: torch.nn.Module, before: StateDict, observed: StateDict, diffusion: Diffusion,
                         recipe: LocalRecipe, image_shape: tuple[int, int, int], settings: InversionSettings,
                         batch: tuple[int, int], gen: torch.Generator, progress: bool) -> Inversion:
    """One plain SGD step: the update is -lr * the batch's gradient exactly, so match it (squared
    distance relative to its norm, scale included), not its direction. Unknowns per draw: x_t and
    r = eps_theta(x_t, t) - eps, not x0 and eps: the gradient, 2 / (B K C H W) sum J(x_t)^T r, is
    linear in r and x_t enters at unit scale, where x0 enters as sqrt(abar_t) x0, a pair badly
    conditioned at large t (Adam on it never converged, even with t given). L-BFGS on (x_t, r)
    often lands on the update itself (relative distance about 1e-9: the weights' float32 rounding).
    t is read off the time MLP (`timestep_guess`, exact for one draw), not optimised. Then
    eps = eps_theta(x_t, t) - r, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), averaged over K.
    Up to `restarts` starts of up to `iterations` L-BFGS iterations, alternately from a grey image
    noised at t and from white noise, stopping at the first that reproduces the update; else the
    nearest is kept (the match decides, never the images). Some updates draw every start into one
    wrong basin (relative distance 0.05 to 0.3): more starts did not help them."""
    b, k = batch
    draws = b * k
    last = diffusion.num_timesteps - 1
    t = timestep_guess(unet, observed, last, draws)
    if t is None:  # no time MLP to read: spread the draws over [0, T)
        t = (torch.arange(draws, dtype=torch.float32) + 0.5) * (last + 1) / draws
    t = t.round().clamp(0, last)[torch.arange(draws) % len(t)]
    abar = diffusion.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    names = [n for n, _ in unet.named_parameters()]
    buffers = dict(unet.named_buffers())
    target = {n: -observed[n] / recipe.learning_rate for n in names}  # the batch's gradient
    target_norm = torch.stack([(g ** 2).sum() for g in target.values()]).sum()
    scale = 2.0 / (draws * int(np.prod(image_shape)))

    def predict(x_t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = {n: before[n].detach().float().clone().requires_grad_(True) for n in names}
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no second derivative
            pred = functional_call(unet, {**params, **buffers}, (x_t, t), {"return_dict": False})[0]
        return pred, params

    def objective(x_t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        pred, params = predict(x_t)
        grads = torch.autograd.grad(scale * (pred * r).sum(), list(params.values()), create_graph=True,
                                    allow_unused=True)
        miss = [((g - target[n]) ** 2).sum() if g is not None else (target[n] ** 2).sum()
                for n, g in zip(names, grads)]
        return torch.stack(miss).sum() / target_norm

    bar = tqdm(total=settings.restarts * settings.iterations, desc="inverting", disable=not progress, leave=False)
    starts = []
    for start in range(settings.restarts):
        if start % 2 == 0:  # x_t and r of a flat grey image noised at the timesteps found
            grey = 0.3 * torch.randn((draws, 1, 1, 1), generator=gen)
            eps = torch.randn((draws, *image_shape), generator=gen)
            x_t = abar.sqrt() * grey + (1 - abar).sqrt() * eps
            r = predict(x_t)[0].detach() - eps
        else:  # white noise, and a small residual (found others when the grey start did not)
            x_t = torch.randn((draws, *image_shape), generator=gen)
            r = 0.1 * torch.randn((draws, *image_shape), generator=gen)
        losses = _lbfgs(objective, [x_t, r], settings.iterations, bar)
        starts.append((losses[-1], [x_t, r], losses))
        if losses[-1] < CONVERGED:  # this start found the update: no other start can beat it by much
            break
    bar.close()
    _, (x_t, r), history = min(starts, key=lambda c: c[0])
    eps = predict(x_t.detach())[0].detach() - r.detach()
    x0 = (x_t.detach() - (1 - abar).sqrt() * eps) / abar.sqrt()
    x0 = x0.reshape(b, k, *image_shape).mean(dim=1).clamp(-1, 1)
    return Inversion(x0, t.reshape(1, b, k), history)


EXACT = 1e-8  # the observed update itself, up to its float32 rounding (measured about 3e-10)
CONVERGED = 1e-4  # a start that found the update (wrong basins measured: > 0.05)


def _lbfgs(objective, variables: list[torch.Tensor], iterations: int, bar, chunk: int = 10) -> list[float]:
    """Up to `iterations` L-BFGS iterations (strong Wolfe line search) on `variables` (updated in
    place), `chunk` at a time, stopping once the loss no longer moves. Returns the loss after each chunk."""
    for v in variables:
        v.requires_grad_(True)
    optimizer = torch.optim.LBFGS(variables, lr=1, max_iter=chunk, history_size=50, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(*variables)
        loss.backward()
        return loss

    losses: list[float] = []
    for done in range(0, iterations, chunk):
        optimizer.param_groups[0]["max_iter"] = min(chunk, iterations - done)
        optimizer.step(closure)
        losses.append(float(torch.enable_grad()(closure)().detach()))
        bar.update(min(chunk, iterations - done))
        bar.set_postfix(loss=f"{losses[-1]:.2e}")
        if losses[-1] < EXACT or (len(losses) > 1 and abs(losses[-2] - losses[-1]) <= 1e-3 * losses[-1]):
            break
    return losses


def _descend(objective, variables: list[torch.Tensor], iterations: int, step_size: float, bar,
             decay: bool = False) -> list[float]:
    """`iterations` Adam steps on `variables` (x0, eps, t_logit; updated in place), x0 kept in
    [-1, 1] (the images' range: the box constraint of Inverting Gradients). Returns the losses."""
    for v in variables:
        v.requires_grad_(True)
    optimizer = torch.optim.Adam(variables, lr=step_size)
    milestones = [int(iterations * f) for f in (0.5, 0.75, 0.9)] if decay else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.3)
    losses = []
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        loss = objective(*variables)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            variables[0].clamp_(-1, 1)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


# --- scoring: the hospital's images, never seen by the optimisation --------------------------------
@dataclass(frozen=True)
class InversionScore:
    """How well reconstructions match a pool of real images. `best_ssim`/`best_psnr` per
    reconstruction (against its most similar pool image, by SSIM); `match` its pool index;
    `reidentified` whether that match is one of the `sources` (the images that produced the
    update); `chance` the rate a random guess would reach (sources / pool)."""

    best_ssim: list[float]
    best_psnr: list[float]
    match: list[int]
    reidentified: list[bool]
    chance: float
    mean_best_ssim: float = field(init=False)
    mean_best_psnr: float = field(init=False)
    reidentification_rate: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_best_ssim", float(np.mean(self.best_ssim)))
        object.__setattr__(self, "mean_best_psnr", float(np.mean(self.best_psnr)))
        object.__setattr__(self, "reidentification_rate", float(np.mean(self.reidentified)))

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_best_ssim": self.mean_best_ssim, "mean_best_psnr": self.mean_best_psnr,
                               "reidentification_rate": self.reidentification_rate}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> InversionScore:
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in ("best_ssim", "best_psnr", "match", "reidentified", "chance")})


def similarity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of two images [C,H,W] in [-1, 1] (scikit-image, data range 2)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, y = a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()
    ssim = structural_similarity(x[0], y[0], data_range=2.0, win_size=min(7, x.shape[-1] // 2 * 2 - 1))
    psnr = peak_signal_noise_ratio(y, x, data_range=2.0)
    return float(ssim), float(min(psnr, 100.0))


def score(reconstructions: torch.Tensor, pool: torch.Tensor, sources: list[int]) -> InversionScore:
    """Match each reconstruction [B,C,H,W] to its most similar image (SSIM) of `pool` [M,C,H,W];
    it re-identifies when that image is one of `sources` (pool indices)."""
    if len(pool) == 0 or len(reconstructions) == 0:
        raise ValueError("need at least one reconstruction and one pool image to score")
    chosen = set(sources)
    best_ssim, best_psnr, match, hit = [], [], [], []
    for r in reconstructions:
        pairs = [similarity(r, p) for p in pool]
        j = int(np.argmax([s for s, _ in pairs]))
        best_ssim.append(pairs[j][0])
        best_psnr.append(pairs[j][1])
        match.append(j)
        hit.append(j in chosen)
    return InversionScore(best_ssim, best_psnr, match, hit, chance=len(chosen) / len(pool))
