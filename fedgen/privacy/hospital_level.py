"""Hospital-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963):
each round, Poisson-sample hospitals, clip each one's update, add Gaussian noise to the sum.

The guarantee is (epsilon_h, delta_h)-DP for a whole hospital: whether it took part at all and
everything its silo taught the model, in every global model the coordinator sends or releases.
It is the coordinator's guarantee, separate from (and composable with) the example- or
patient-level DP-SGD each hospital runs on its own images (`accounting`, `dp_sgd`).

Assumptions, stated once:
- Add/remove adjacency on hospitals. Each round every connected hospital is in the round
  independently with probability q_h (`privacy.hospital_level.sample_rate`), drawn from the same
  secret randomness as the noise (`randomness`); nobody outside the coordinator learns who was in.
- Every round releases sum + noise, the empty round included: a round that samples no hospital
  (or whose sampled hospitals all fail) moves the model by the noise alone. Leaving the model
  unchanged would reveal that nobody was sampled, which the subsampled-Gaussian analysis does not
  cover.
- One hospital's contribution to the sum is its update (new weights - the round's global weights,
  all floating-point tensors as one vector) clipped to L2 norm C. A hospital that fails or is
  rejected contributes 0, also within C.
- The sum gets N(0, (sigma C)^2) per coordinate and is divided by the *expected* number of
  hospitals q_h n (n = federation.num_hospitals), not the number that replied: that count depends
  on who was sampled, so dividing by it would change the sensitivity (and reveal the count).
  Every hospital weighs the same, whatever its number of images.
- sigma is calibrated once for all planned rounds (federation.num_rounds) with the run's Opacus
  accountant (`privacy.accountant`); the ledger (`<run>/hospital_level_ledger.json`, an
  `EpsilonLedger` whose steps are rounds) is saved as each round's noisy sum is made, before the
  checkpoint, so a crash can only over-count, and a round that would pass the budget is refused.
- The coordinator is trusted with the individual updates (central DP): what it keeps for itself
  (metrics.json, `federation.record_updates`) is not covered; the models it sends and releases are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from fedgen.config import ConfigError, ExperimentConfig, PrivacyConfig
from fedgen.privacy.accounting import EpsilonLedger, TrainingPlan, epsilon_of
from fedgen.privacy.randomness import NO_GUARANTEE, Randomness, privacy_randomness

StateDict = dict[str, torch.Tensor]
LEDGER_FILE = "hospital_level_ledger.json"
GUARANTEE = "hospital level at the coordinator (one hospital's participation and whole silo)"


def clip_update(update: StateDict, global_state: StateDict, clipping_norm: float) -> tuple[StateDict, float]:
    """(update - global, scaled to L2 norm <= C over all floating-point tensors; its norm before
    clipping). Non-floating tensors (counters) are not part of the update."""
    delta = {k: update[k].double() - g.double() for k, g in global_state.items() if g.is_floating_point()}
    norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}, norm


def noisy_mean(global_state: StateDict, updates: Sequence[StateDict], clipping_norm: float, noise_multiplier: float,
               expected_count: float, randomness: Randomness) -> tuple[StateDict, list[float]]:
    """global + (sum of clipped updates + N(0, (sigma C)^2 I)) / expected_count, and each update's
    norm before clipping. Shapes are those of `global_state`; the sum is kept in float64."""
    total = {k: torch.zeros_like(g, dtype=torch.float64) for k, g in global_state.items() if g.is_floating_point()}
    norms = []
    for update in updates:
        clipped, norm = clip_update(update, global_state, clipping_norm)
        norms.append(norm)
        for k in total:
            total[k] += clipped[k]
    released = {}
    for k, g in global_state.items():
        if k not in total:
            released[k] = g.clone()
            continue
        noise = randomness.gaussian(total[k], noise_multiplier * clipping_norm)
        released[k] = (g.double() + (total[k] + noise) / expected_count).to(g.dtype)
    return released, norms


def _as_plan(cfg: ExperimentConfig) -> tuple[PrivacyConfig, TrainingPlan]:
    """The hospital-level mechanism in the terms `EpsilonLedger` plans in: the 'examples' are the
    hospitals, one step is one round."""
    h, fed = cfg.privacy.hospital_level, cfg.federation
    privacy = PrivacyConfig(target_epsilon=h.target_epsilon, delta=h.delta, noise_multiplier=h.noise_multiplier,
                            accountant=cfg.privacy.accountant)
    return privacy, TrainingPlan(fed.num_hospitals, h.sample_rate, 1, 1, fed.num_rounds)


def _renamed(err: ConfigError) -> ConfigError:
    """accounting's messages name the per-hospital settings; here they mean the hospital-level ones."""
    text = str(err).replace("privacy.", "privacy.hospital_level.").replace(" steps", " rounds")
    return ConfigError(f"{text} (hospital-level DP)")


def hospital_level_sigma(cfg: ExperimentConfig) -> float:
    """The calibrated noise multiplier, or a ConfigError for a budget no noise can meet."""
    try:
        return EpsilonLedger.start(*_as_plan(cfg)).noise_multiplier
    except ConfigError as err:
        raise _renamed(err) from err


class HospitalLevelDP:
    """One run's hospital-level mechanism: sampling, clip + noise, and the ledger file."""

    def __init__(self, cfg: ExperimentConfig, path: str | Path):
        self.cfg = cfg
        self.settings = cfg.privacy.hospital_level
        self.path = Path(path)
        self.reproducible = cfg.privacy.reproducible_noise
        try:
            self.ledger = EpsilonLedger.open(self.path, *_as_plan(cfg))
        except ConfigError as err:
            raise _renamed(err) from err
        self.randomness: Randomness | None = None

    @property
    def noise_multiplier(self) -> float:
        return self.ledger.noise_multiplier

    @property
    def expected_count(self) -> float:
        return self.settings.sample_rate * self.cfg.federation.num_hospitals

    def begin_round(self, server_round: int) -> None:
        """Before anything is sent: refuse a round past the budget (BudgetExceededError), and
        draw this round's randomness (secret unless privacy.reproducible_noise)."""
        self.ledger.check_budget(1)
        self.randomness = privacy_randomness(self.reproducible, self.cfg.seed, "hospital-level", server_round)

    def sample(self, count: int) -> list[bool]:
        """Poisson: each of `count` hospitals is in this round with probability q_h."""
        assert self.randomness is not None, "begin_round first"
        return [bool(u < self.settings.sample_rate) for u in self.randomness.uniform(count)]

    def release(self, server_round: int, global_state: StateDict, updates: Sequence[StateDict]) -> tuple[StateDict, dict]:
        """The round's new global model from the usable updates (possibly none), recorded in the
        ledger (saved at once). Returns (state, what the round record keeps)."""
        assert self.randomness is not None, "begin_round first"
        h = self.settings
        state, norms = noisy_mean(global_state, updates, h.clipping_norm, self.noise_multiplier,
                                  self.expected_count, self.randomness)
        accountant = self.ledger.make_accountant()
        accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=h.sample_rate)
        self.ledger.record(accountant, server_round, 1, self.reproducible)
        self.ledger.save(self.path)
        self.randomness = None  # one round's noise, once
        info = {
            "summed": len(updates),
            "clipped": sum(n > h.clipping_norm for n in norms),
            "noise_std": self.noise_multiplier * h.clipping_norm / self.expected_count,  # per weight
            "epsilon": self.ledger.epsilon,
            "rounds_spent": self.ledger.steps,
        }
        return state, info

    def to_dict(self) -> dict:
        """The ledger as metrics.json and privacy.json state it."""
        return {**self.ledger.to_dict(), "guarantee_level": GUARANTEE, "clipping_norm": self.settings.clipping_norm,
                "num_hospitals": self.cfg.federation.num_hospitals, "expected_hospitals": self.expected_count}


def hospital_level_card(entry: dict) -> dict:
    """privacy.json's "hospital_level" section from `HospitalLevelDP.to_dict()`."""
    history = [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
    reproducible = bool(entry.get("guarantee") == NO_GUARANTEE)
    return {
        "unit": "hospital (its participation and its whole silo)",
        "where": "the coordinator: Poisson sampling of hospitals, per-hospital update clipping, Gaussian noise on the sum",
        "epsilon": entry["epsilon"],
        "epsilon_recomputed": epsilon_of(history, entry["accountant"], float(entry["delta"])),
        "delta": entry["delta"],
        "budget": entry["budget"],
        "accountant": entry["accountant"],
        "sampling": "Poisson, rate q_h per hospital per round",
        "sample_rate": entry["sample_rate"],
        "noise_multiplier": entry["noise_multiplier"],
        "history": [list(x) for x in history],
        "rounds": sum(n for _, _, n in history),
        "planned_rounds": entry["planned_steps"],
        "clipping_norm": entry["clipping_norm"],
        "noise_std_on_sum": entry["noise_multiplier"] * entry["clipping_norm"],
        "denominator": f"expected hospitals q_h x n = {entry['expected_hospitals']:g}",
        "reproducible_noise": reproducible,
    }
