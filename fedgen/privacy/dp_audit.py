"""The white-box audit of fedgen's DP-SGD: does the implementation privatise as the accountant says?

For the people who run fedgen, not an attacker: a black-box audit with image canaries (`fedgen
attack`) finds an empirical epsilon far below the accountant's, too loose to notice an epsilon off
by 10x. This one is as strong as the hospital itself (Nasr et al. 2023; the white-box setting of
Steinke, Nasr & Jagielski 2023), on one run of a DP-SGD recipe (sigma, q, T, C, model):

1. m gradient canaries (`gradient_canaries`): Dirac rows of norm 4C on the coordinates the real
   images' gradients touch least. Each joins the training set with probability 1/2 (the auditor's
   coin, seeded); the included ones are then Poisson-sampled at rate q at every step together
   with the images, by the production sampler (`poisson_batches`, secret randomness).
2. T steps of the real `noisy_step` and `NoisingDPOptimizer`: the sampled canaries' rows join
   the images' per-example gradients before clipping (`extra_rows`), then one clipping, one sum,
   the secret Gaussian noise, one division by the expected batch size E[B] = round(q n).
3. Observation: the model's parameters before and after each step. The update rule after the
   noisy gradient is post-processing (free in privacy), so the audit takes plain SGD with lr 1,
   from which the noisy gradient reads back exactly: g = before - after.
4. Score of canary i: sum over the steps of g along its coordinate, in units of C / E[B]: an
   included canary adds 1 at each step that samples it, on top of N(0, sigma^2) noise per step.
5. Bounds (`fedgen.audit_bounds`): the f-DP one-run bound for a Gaussian trade-off curve
   (Mahloujifar et al. 2024; the headline, and the verdict) and the distribution-free one of
   Steinke et al. 2023, both at 95% confidence, set against the accountant's epsilon for the
   recipe. A bound above it means the implementation is broken. The f-DP bound's guess counts
   are pre-registered from the claimed recipe alone (`gdp_tests`): most of the error budget on
   the count where simulated runs of a correct implementation give the tightest bound, the rest
   on a grid up to all m canaries, which can certify the large epsilon of a broken one.

The images are the caller's: `fedgen audit-dp` uses synthetic X-rays, never a hospital's patients,
since the audit's output is one more DP release of whatever it trains on. Deliberately broken
variants (`_BROKEN`: noise 4x too small, clipping off) exist for the audit's own tests, reachable
only through the private `_broken` argument: no setting can turn them on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from fedgen.audit_bounds import one_run_epsilon_lb_best, one_run_gdp_lb, one_run_guess_grid
from fedgen.diffusion import Diffusion
from fedgen.privacy.accounting import epsilon_of
from fedgen.privacy.dp_optimizer import NoisingDPOptimizer
from fedgen.privacy.dp_sgd import noisy_step
from fedgen.privacy.gradient_canaries import (
    CANARY_NORM,
    CanaryRows,
    ParameterLayout,
    quietest_coordinates,
)
from fedgen.privacy.randomness import SecretRandomness, poisson_batches
from fedgen.seeding import torch_generator

PROBE_IMAGES = 32  # images whose gradients choose the canaries' coordinates
# The error budget of the f-DP bound: PLANNED_SHARE to the one number of guesses where the
# claimed recipe's bound is tightest (`planned_guesses`), the rest split over the fraction grid,
# whose many guesses are what can certify a large epsilon when the implementation is broken.
PLANNED_SHARE = 0.8
CANDIDATE_GUESSES = (20, 40, 80, 160, 320, 640, 1280, 2560)
SIMULATIONS = 5


@dataclass(frozen=True)
class DpSgdRecipe:
    """What DP-SGD promises for: noise multiplier sigma, Poisson rate q, T steps, clipping bound C."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str = "rdp"

    @property
    def epsilon(self) -> float:
        """The accountant's epsilon for the recipe, at delta (inf without noise)."""
        if self.noise_multiplier <= 0:
            return math.inf
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.steps)], self.accountant, self.delta)


@dataclass(frozen=True)
class DpAuditResult:
    recipe: DpSgdRecipe
    accountant_epsilon: float
    epsilon_lb: float  # f-DP one-run bound (Gaussian trade-off curve): the verdict's
    mu_lb: float  # the mu-GDP claim it rejects
    guesses: int  # of the f-DP bound: guesses made, and how many were right
    correct: int
    planned_guesses: int  # the guess count pre-registered from the recipe (`planned_guesses`)
    epsilon_lb_steinke: float  # distribution-free one-run bound
    guesses_steinke: int
    correct_steinke: int
    canaries: int  # m
    included: int
    images: int  # real (non-canary) examples trained on
    seconds: float
    broken: str | None = None  # the deliberately broken variant audited (tests only)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # [m], C/E[B] units
    is_included: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)  # [m]

    @property
    def verdict(self) -> str:
        if self.epsilon_lb > self.accountant_epsilon:
            return "broken: the lower bound exceeds the accountant's epsilon"
        return "consistent: no evidence against the accountant's epsilon"

    @property
    def is_broken(self) -> bool:
        return self.epsilon_lb > self.accountant_epsilon

    def to_dict(self) -> dict:
        """The numbers (not the per-canary arrays), with the ratio to the accountant and the verdict."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("scores", "is_included")}
        out["recipe"] = dataclasses.asdict(self.recipe)
        out["ratio"] = self.epsilon_lb / self.accountant_epsilon
        out["verdict"] = self.verdict
        return out


def simulated_scores(recipe: DpSgdRecipe, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores of m Dirac canaries under the claimed recipe, without a model: an included canary
    collects Binomial(T, q) clipped contributions of 1, every score N(0, T sigma^2) of noise.
    Returns (scores [m], is_included [m])."""
    included = rng.random(m) < 0.5
    sampled = rng.binomial(recipe.steps, recipe.sample_rate, size=m) * included
    return sampled + recipe.noise_multiplier * math.sqrt(recipe.steps) * rng.standard_normal(m), included


def planned_guesses(recipe: DpSgdRecipe, m: int, significance: float, seed: int = 0) -> int:
    """The number of guesses r (from CANDIDATE_GUESSES) whose f-DP bound is highest, on average
    over SIMULATIONS simulated runs of the claimed recipe. Chosen from the claim alone, before
    any score of the real run exists, so testing it costs no correction beyond its significance."""
    rng = np.random.default_rng(seed)
    candidates = [r for r in CANDIDATE_GUESSES if r <= m] or [2 * (m // 2)]
    totals = np.zeros(len(candidates))
    for _ in range(SIMULATIONS):
        scores, included = simulated_scores(recipe, m, rng)
        for j, r in enumerate(candidates):
            totals[j] += one_run_gdp_lb(scores, included, recipe.delta, [(r, significance)]).epsilon
    return candidates[int(np.argmax(totals))]


def gdp_tests(recipe: DpSgdRecipe, m: int, confidence: float) -> list[tuple[int, float]]:
    """The f-DP bound's pre-registered (guesses, significance) tests; significances sum to 1 - confidence."""
    alpha = 1.0 - confidence
    grid = one_run_guess_grid(m)
    planned = planned_guesses(recipe, m, PLANNED_SHARE * alpha)
    return [(planned, PLANNED_SHARE * alpha), *[(2 * k, (1 - PLANNED_SHARE) * alpha / len(grid)) for k, _ in grid]]


class _UnclippedDPOptimizer(NoisingDPOptimizer):
    """Deliberately broken: sums the per-example gradients without clipping them (noise as usual)."""

    max_grad_norm: float

    def clip_and_accumulate(self) -> None:
        bound, self.max_grad_norm = self.max_grad_norm, math.inf  # clip factor min(1, inf) = 1
        try:
            super().clip_and_accumulate()
        finally:
            self.max_grad_norm = bound


# Deliberately broken DP-SGD, which the audit must catch: for its tests only (`_broken`).
_BROKEN = {
    "noise/4": lambda **kw: NoisingDPOptimizer(**{**kw, "noise_multiplier": kw["noise_multiplier"] / 4}),
    "no-clipping": lambda **kw: _UnclippedDPOptimizer(**kw),
}


def audit_dp_sgd(
    unet: torch.nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    recipe: DpSgdRecipe,
    num_canaries: int,
    *,
    seed: int = 0,
    confidence: float = 0.95,
    max_physical_batch_size: int = 0,
    canary_chunk: int = 256,
    _broken: str | None = None,
) -> DpAuditResult:
    """Train `unet` (changed in place) for recipe.steps DP-SGD steps on `images` [N,1,H,W] (on the
    unet's device) plus `num_canaries` gradient canaries, and bound epsilon from the canaries'
    scores. `seed` fixes the canaries and their inclusion, never the DP noise or the sampling."""
    if _broken is not None and _broken not in _BROKEN:
        raise ValueError(f"unknown broken variant {_broken!r}; known: {', '.join(_BROKEN)}")
    start = time.perf_counter()
    tests = gdp_tests(recipe, num_canaries, confidence)  # pre-registered: from the claim alone
    gen = torch_generator(seed, "dp-audit")
    device = next(unet.parameters()).device
    layout = ParameterLayout(unet)
    unet.train()
    probe = images[:PROBE_IMAGES]
    t, eps = diffusion.draw(probe.cpu(), 1, generator=gen)
    coordinates = quietest_coordinates(layout, unet, diffusion, probe, t.to(device), eps.to(device),
                                       num_canaries, recipe.max_grad_norm, gen)
    included = torch.rand(num_canaries, generator=gen) < 0.5
    members = coordinates[included]  # the canaries in the training set, by coordinate
    n_images = len(images)
    expected_batch = max(1, round(recipe.sample_rate * (n_images + len(members))))

    sgd = torch.optim.SGD(layout.params, lr=1.0)
    build = _BROKEN[_broken] if _broken is not None else NoisingDPOptimizer
    dp_optimizer = build(
        optimizer=sgd,
        noise_multiplier=recipe.noise_multiplier,
        max_grad_norm=recipe.max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        randomness=SecretRandomness(),
    )
    rows = CanaryRows(layout, CANARY_NORM * recipe.max_grad_norm, canary_chunk, device)
    unit = recipe.max_grad_norm / expected_batch  # one clipped canary's share of the update
    scores = np.zeros(num_canaries)
    batches = poisson_batches(n_images + len(members), recipe.sample_rate, recipe.steps, dp_optimizer.randomness)
    for index in batches:
        real, canary = index[index < n_images], index[index >= n_images] - n_images
        x0 = images[real]
        t, eps = diffusion.draw(x0.cpu(), 1, generator=gen)
        before = layout.flat()[coordinates]
        dp_optimizer.zero_grad(set_to_none=True)
        noisy_step(dp_optimizer, unet, diffusion, x0, t.to(device), eps.to(device), max_physical_batch_size,
                   extra_rows=rows.set_step(members[canary]))
        sgd.step()
        scores += ((before - layout.flat()[coordinates]) / unit).numpy()
    dp_optimizer.zero_grad(set_to_none=True)  # drop grad_sample references

    fdp = one_run_gdp_lb(scores, included.numpy(), recipe.delta, tests)
    steinke = one_run_epsilon_lb_best(scores, included.numpy(), recipe.delta, confidence)
    return DpAuditResult(
        recipe=recipe,
        accountant_epsilon=recipe.epsilon,
        epsilon_lb=fdp.epsilon,
        mu_lb=fdp.mu,
        guesses=fdp.num_guesses,
        correct=fdp.num_correct,
        planned_guesses=tests[0][0],
        epsilon_lb_steinke=steinke.epsilon,
        guesses_steinke=steinke.num_guesses,
        correct_steinke=steinke.num_correct,
        canaries=num_canaries,
        included=int(included.sum()),
        images=n_images,
        seconds=time.perf_counter() - start,
        broken=_broken,
        scores=scores,
        is_included=included.numpy(),
    )

