"""Secure aggregation (SecAgg+, Bell et al. 2020) as fedgen uses it, without Flower: what a
hospital masks, what it checks before masking, and how far the sum may stray from plain FedAvg.

With `federation.secure_aggregation=true` the coordinator receives only the weighted sum of the
hospitals' updates (Flower's `SecAggPlusWorkflow` on the server, `secaggplus_mod` on the
hospitals; the adapters are `server/secure_aggregation.py` and `clients/app.py`). Decisions:

- **What is masked.** The update, delta = new weights - global weights [per parameter tensor],
  multiplied by the hospital's share r = num_examples / max_weight, quantised and masked. Only
  the weights travel masked; the hospital's metrics (epsilon, ledger counts, num-examples, train
  loss) travel in the clear beside them, as before: the coordinator must account every
  hospital's epsilon, and they hold no image.
- **Weighted FedAvg.** Each hospital also sends its quantised share r_i (masked with the rest),
  so the server obtains sum_i r_i delta_i and sum_i r_i and divides: the weighted mean of the
  updates, which the server adds to the global model.
- **Checks move to the hospital.** The server can no longer look at an update, so before masking
  the hospital refuses (raises, which the protocol treats as a dropout) an update with wrong
  keys or shapes, NaN/Inf, a norm above `federation.max_update_norm`, a coordinate that the
  quantiser would clip (|r delta| > clipping range: the sum would be silently wrong), or a weight
  above `secagg_max_weight`. The server checks the aggregate: keys, finiteness, norm.
  A hospital running altered code can therefore poison the aggregate undetected: that is the
  known price of secure aggregation (the server cannot inspect what it cannot see).
- **Quantisation error.** Each hospital stochastically rounds C + r_i delta_i onto a grid of
  step s = 2C / Q (C the clipping range, Q the quantisation range): an error below s per
  coordinate. Summed over n hospitals and divided by sum r_i, the released update differs from
  FedAvg of the same updates by less than n s / sum r_i per coordinate (`error_bound`), plus
  float32 rounding when added to the weights. The weights r_i are themselves rounded to 1/Q,
  which shifts the mean by less than 1/Q relative: negligible beside the bound.
- **Dropouts.** A hospital that fails or refuses after the keys were shared is recovered by the
  protocol if enough of its neighbours answer: the reconstruction threshold is the number of
  usable updates the round needs (`Coordinator.required_updates`), at least 2, so the protocol
  halts exactly where the round would have left the model unchanged anyway.

Not covered: Flower 1.41 expands every mask from a 32-bit seed (`pseudo_rand_gen` folds the
256-bit key into numpy's `RandomState` seed), so a coordinator ready to search 2^32 seeds per
pairwise mask, with a guess of what an update looks like, could strip a mask offline. With two
hospitals that is one search; the protection is against a coordinator that runs the protocol as
shipped and does not mount that search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedgen.config import ExperimentConfig
from fedgen.federation.update_checks import StateDict, update_problem

# The integer grid and the mask modulus (Flower's own modulus; its default Q is 2**22). Sums of
# n quantised shares must stay below the modulus: n * Q < MODULUS, hence MAX_HOSPITALS.
# The config key of a SecAgg+ training instruction naming, as a JSON list, the state-dict keys of
# its flat list of arrays (the legacy FitIns carries no names).
KEYS = "fedgen-keys"
QUANTIZATION_RANGE = 2**26
MODULUS_RANGE = 2**32
MAX_HOSPITALS = MODULUS_RANGE // QUANTIZATION_RANGE - 1


@dataclass(frozen=True)
class SecAggSettings:
    clipping_range: float  # C: a hospital's |r * delta| per coordinate must stay within it
    max_weight: float  # the largest num-examples a hospital may weigh in with (r = n / max_weight <= 1)
    quantization_range: int = QUANTIZATION_RANGE
    modulus_range: int = MODULUS_RANGE

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> SecAggSettings:
        fed = cfg.federation
        return cls(clipping_range=float(fed.secagg_clipping_range), max_weight=float(fed.secagg_max_weight))

    def share(self, num_examples: float) -> float:
        """A hospital's weight as the protocol rounds it: r = round(n / max_weight * Q) / Q."""
        return round(num_examples / self.max_weight * self.quantization_range) / self.quantization_range

    def error_bound(self, weights: list[float]) -> float:
        """Largest difference per coordinate between the securely aggregated update and FedAvg
        of the same updates, for hospitals of these `weights` (num-examples), before float32."""
        step = 2 * self.clipping_range / self.quantization_range
        return len(weights) * step / sum(self.share(w) for w in weights)


def update_delta(global_state: StateDict, new_state: StateDict) -> StateDict:
    """new - global, per tensor, in float32 (what a hospital masks)."""
    return {k: (new_state[k].float() - global_state[k].float()) for k in global_state}


def masking_problem(
    global_state: StateDict, new_state: StateDict, num_examples: float, cfg: ExperimentConfig
) -> str | None:
    """Why a hospital must refuse to mask and send this update, or None. The server cannot check
    a masked update, so the hospital runs the server's checks (`update_problem`) itself, and
    refuses what the quantiser would silently clip."""
    settings = SecAggSettings.from_config(cfg)
    problem = update_problem(global_state, new_state, cfg.federation.max_update_norm)
    if problem:
        return problem
    for name, value in new_state.items():
        if not torch.is_floating_point(value):
            return f"{name} is not floating point ({value.dtype}): secure aggregation sums floats only"
    if not (math.isfinite(num_examples) and 0 < num_examples <= settings.max_weight):
        return (f"num-examples {num_examples:g} is not in (0, federation.secagg_max_weight="
                f"{settings.max_weight:g}]: raise secagg_max_weight to the largest silo")
    r = settings.share(num_examples)
    largest = max(float(d.abs().max()) for d in update_delta(global_state, new_state).values() if d.numel())
    if r * largest > settings.clipping_range:
        return (f"an update coordinate of {largest:.3g} (times the weight share {r:.3g}) exceeds "
                f"federation.secagg_clipping_range={settings.clipping_range:g}: it would be clipped "
                "and the aggregate silently wrong")
    return None


def apply_update(global_state: StateDict, mean_delta: StateDict) -> StateDict:
    """The new global model: global + the weighted mean of the updates, in each tensor's dtype."""
    return {k: (v.double() + mean_delta[k].double()).to(v.dtype) for k, v in global_state.items()}
