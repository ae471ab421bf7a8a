"""One hospital's local training: DP-SGD (Opacus optimizer and accountant) or plain SGD.

Both modes share one loop: Poisson-sampled batches, the same per-example loss with K draws of
(timestep, noise) per example (noise multiplicity, Dockhorn et al. 2023: averaging before clipping
lowers the gradient's variance at no privacy cost, since each example still contributes one
clipped gradient per step). DP mode computes exact per-example gradients (`per_sample_grads`),
lets Opacus's DPOptimizer clip them to C, sum, add N(0, sigma^2 C^2) noise and divide by the
expected batch size, and lets the accountant record every step. The Poisson sampling and the noise
are secret (`randomness`): nobody holding the config can predict them. Plain mode backpropagates the
batch mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fedgen.config import ExperimentConfig
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.privacy.accounting import EpsilonLedger, TrainingPlan
from fedgen.privacy.dp_optimizer import NoisingDPOptimizer
from fedgen.privacy.gradient_subspace import GradientSubspace, public_subspace
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.privacy.randomness import poisson_batches, privacy_randomness


@dataclass(frozen=True)
class LocalTrainingResult:
    loss: float  # mean per-example denoising loss over the local training
    num_examples: int  # training images N (Poisson sampling is over these)
    steps: int  # optimizer steps taken (noisy releases, in DP mode)
    epsilon: float  # cumulative epsilon after this training (inf without DP)
    delta: float
    noise_multiplier: float  # 0 without DP
    seconds: float
    cpu_seconds: float  # this process's CPU time while training (compute, not waiting)


def make_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    if cfg.training.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.training.learning_rate)
    return torch.optim.SGD(params, lr=cfg.training.learning_rate)


def learning_rate_at(cfg: ExperimentConfig, plan: TrainingPlan, server_round: int, step: int) -> float:
    """The rate of local step `step` (from 0) of round `server_round`: training.learning_rate, or
    under `cosine` that rate times (1 + cos(pi s / S)) / 2, s this step's index in the whole plan
    and S the plan's steps (all rounds). A function of the plan only, which every party knows."""
    rate = cfg.training.learning_rate
    if cfg.training.lr_schedule == "constant":
        return rate
    total = plan.steps_per_round * plan.num_rounds
    s = min((server_round - 1) * plan.steps_per_round + step, total)
    return rate * 0.5 * (1.0 + math.cos(math.pi * s / total))


def noisy_step(
    dp_optimizer: NoisingDPOptimizer,
    unet: torch.nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    max_physical_batch_size: int = 0,
    extra_rows: Sequence[dict[str, torch.Tensor]] = (),
    group_of: torch.Tensor | None = None,
    subspace: GradientSubspace | None = None,
) -> torch.Tensor:
    """One DP step on a logical batch: per-example gradients clipped and summed chunk by chunk
    (at most `max_physical_batch_size` images at once; 0: all), then noise added once, scaled and
    accounted: one release, however many chunks. An empty batch is one empty chunk: noise only.
    `extra_rows` (the white-box audit only, `fedgen.privacy.dp_audit`): more chunks of
    per-example gradient rows {name: [R, *param.shape]}, clipped and summed after the batch's,
    before the noise. `group_of` [B] (patient-level DP): the unit of each image, contiguous and
    sorted; a unit's rows are summed before clipping, so a patient contributes at most C however
    many images it has. `subspace`: each row is projected onto it before clipping, and the noisy
    gradient after (`fedgen.privacy.gradient_subspace`). Returns the per-example losses [B] of the images."""
    size = max_physical_batch_size or max(len(x0), 1)
    slices = group_chunks(group_of, size) if group_of is not None and len(x0) else [
        slice(start, start + size) for start in range(0, max(len(x0), 1), size)]
    chunks = len(slices) + len(extra_rows)
    losses = []
    for i in range(chunks):
        if i < len(slices):
            chunk = slices[i]
            grads, chunk_losses = per_sample_gradients(unet, diffusion, x0[chunk], t[chunk], eps[chunk])
            losses.append(chunk_losses.detach())
            if group_of is not None and len(x0):
                grads = sum_by_group(grads, group_of[chunk])
        else:
            grads = extra_rows[i - len(slices)]
        if subspace is not None:
            grads = subspace.project_rows(grads)
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.grad_sample = grads[name]  # type: ignore[attr-defined]  # read by Opacus
        if i < chunks - 1:
            dp_optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only
        dp_optimizer.pre_step()  # the last chunk: clip, accumulate, noise, scale, account
    if subspace is not None:
        subspace.project_gradients(unet)  # post-processing: the noise left is k-dimensional
    return torch.cat(losses)


def group_chunks(group_of: torch.Tensor, size: int) -> list[slice]:
    """Consecutive slices of a batch sorted by unit, at most `size` images each (a unit larger than
    `size` goes alone), never splitting a unit: its rows must be summed before one clipping."""
    unit_ends = (torch.nonzero(group_of[1:] != group_of[:-1]).flatten() + 1).tolist() + [len(group_of)]
    slices, start, last = [], 0, 0
    for end in unit_ends:
        if end - start > size and last > start:  # this unit would overflow the chunk: close it
            slices.append(slice(start, last))
            start = last
        last = end
    slices.append(slice(start, len(group_of)))
    return slices


def sum_by_group(grads: dict[str, torch.Tensor], group_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example rows [B, ...] to per-unit rows [U, ...]: the sum of each unit's examples."""
    local = group_of - group_of[0]
    units = int(local[-1]) + 1
    return {name: g.new_zeros((units, *g.shape[1:])).index_add_(0, local, g) for name, g in grads.items()}


def privacy_units(patient_ids, unit: str) -> torch.Tensor | None:
    """The DP unit of each training image: None for example-level DP (each image its own unit);
    for patient-level, the patient's index (0..patients-1), shared by all its images."""
    if unit == "example":
        return None
    _, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1)).long()


def unit_count(groups: torch.Tensor | None, num_images: int) -> int:
    """How many units Poisson sampling draws from: patients, or images."""
    return num_images if groups is None else (int(groups.max()) + 1 if len(groups) else 0)


def units_to_images(groups: torch.Tensor, num_units: int) -> list[torch.Tensor]:
    """The image indices of each unit (patient), from the unit index of every image."""
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=num_units).tolist()
    return list(torch.split(order, counts))


def train_locally(
    unet: torch.nn.Module,
    diffusion: Diffusion,
    images: torch.Tensor,
    cfg: ExperimentConfig,
    plan: TrainingPlan,
    ledger: EpsilonLedger | None,
    seed_parts: tuple,
    server_round: int = 1,
    proximal_mu: float = 0.0,
    progress: bool = False,
    groups: torch.Tensor | None = None,
) -> LocalTrainingResult:
    """Run `plan.steps_per_round` Poisson-sampled steps on `images` [N,1,H,W] (on unet's device).

    `groups` [N] (patient-level DP): the unit (0..plan.num_examples-1) of each image. Units are
    Poisson-sampled, all of a sampled unit's images join the batch, and DP clips each unit's summed
    gradient (`noisy_step`). None: each image is its own unit.

    DP mode needs a `ledger`: its budget is checked before the first step (BudgetExceededError),
    its accountant history continues here, and it is updated (not saved) at the end; the caller
    saves it. `proximal_mu` > 0 adds FedProx's mu/2 ||w - w_global||^2; its gradient depends only
    on the weights, so adding it after the noise is post-processing.
    """
    device = next(unet.parameters()).device
    steps = plan.steps_per_round
    if ledger is not None:
        ledger.check_budget(steps)
    # The sampling and the DP noise (the guarantee) and the diffusion loss's (timestep, noise) draws
    # (which would help a coordinator invert the update): secret unless the config asks for the
    # test-only switch.
    randomness = privacy_randomness(cfg.privacy.reproducible_noise, *seed_parts)
    gen = randomness.draws_generator()
    params = [p for p in unet.parameters() if p.requires_grad]
    global_weights = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    base_optimizer = make_optimizer(cfg, params)
    dp_optimizer: NoisingDPOptimizer | None = None
    if ledger is not None:
        dp_optimizer = NoisingDPOptimizer(
            base_optimizer,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            expected_batch_size=max(1, round(plan.sample_rate * plan.num_examples)),
            loss_reduction="mean",
            randomness=randomness,
        )
        accountant = ledger.make_accountant()
        dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))

    # An EMA of the local iterates, started at the global weights: a function of the noisy steps
    # only, so sending it instead of the last iterate is post-processing (free in privacy).
    ema_decay = cfg.training.ema_decay
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else []

    unet.train()
    # Found on public images at the weights the round starts from: the same for every hospital.
    subspace = (public_subspace(unet, diffusion, cfg, (cfg.seed, server_round))
                if dp_optimizer is not None and cfg.training.gradient_subspace > 0 else None)
    denoiser = unet_denoiser(unet)
    k = cfg.training.noise_multiplicity
    low_high = cfg.training.timestep_range
    timesteps = (low_high[0], low_high[1]) if low_high else None
    loss_sum, loss_count, taken = 0.0, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=steps, desc=f"round {server_round} local", disable=not progress, leave=False)
    unit_images = units_to_images(groups, plan.num_examples) if groups is not None else None
    group_of = None
    for epoch in range(plan.local_epochs):
        batches = poisson_batches(plan.num_examples, plan.sample_rate, plan.steps_per_epoch, randomness)
        for step, index in enumerate(batches, start=epoch * plan.steps_per_epoch):
            if unit_images is not None:  # sampled units -> their images, grouped contiguously
                members = [unit_images[u] for u in index.tolist()]
                group_of = torch.repeat_interleave(torch.arange(len(members)),
                                                   torch.tensor([len(m) for m in members], dtype=torch.long))
                index = torch.cat(members) if members else index
            x0 = images[index].to(device)
            t, eps = diffusion.draw(x0.cpu(), k, generator=gen, timesteps=timesteps)
            t, eps = t.to(device), eps.to(device)
            (dp_optimizer or base_optimizer).zero_grad(set_to_none=True)
            if dp_optimizer is not None:
                losses = noisy_step(dp_optimizer, unet, diffusion, x0, t, eps, cfg.training.max_physical_batch_size,
                                    group_of=group_of, subspace=subspace)
            elif len(index) > 0:
                losses = diffusion.per_example_loss(denoiser, x0, t, eps)
                losses.mean().backward()
            else:
                losses = x0.new_zeros(0)  # an empty batch: nothing to learn, no step
                bar.update(1)
                continue
            for p, w in zip(params, global_weights):
                assert p.grad is not None
                p.grad.add_(p.detach() - w, alpha=proximal_mu)
            for group in base_optimizer.param_groups:
                group["lr"] = learning_rate_at(cfg, plan, server_round, step)
            base_optimizer.step()
            for average, p in zip(ema, params):
                average.lerp_(p.detach(), 1.0 - ema_decay)
            loss_sum += float(losses.detach().sum())
            loss_count += len(index)
            taken += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.4f}")
    bar.close()
    with torch.no_grad():  # release the average of the iterates, not the last one
        for average, p in zip(ema, params):
            p.copy_(average)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    loss = loss_sum / max(loss_count, 1)
    if ledger is None or dp_optimizer is None:
        return LocalTrainingResult(loss, plan.num_examples, taken, float("inf"), 0.0, 0.0, seconds, cpu_seconds)
    dp_optimizer.zero_grad(set_to_none=True)  # drop grad_sample references
    ledger.record(accountant, server_round, taken, reproducible_noise=randomness.reproducible)
    return LocalTrainingResult(
        loss, plan.num_examples, taken, ledger.epsilon, ledger.delta, ledger.noise_multiplier, seconds, cpu_seconds
    )
