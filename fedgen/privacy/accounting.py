"""Privacy accounting for one hospital: the training plan, noise calibration and the epsilon ledger.

Opacus sits behind this module (with `dp_sgd.py`, which uses its optimizer and sampler).

Privacy assumptions, stated once:
- Example-level DP for the hospital's training images (an image duplicated k times counts as k
  examples: duplication weakens the guarantee for that image, which the attacks study).
- Poisson sampling with rate q = batch_size / N at every step, and every sampled step releases a
  noisy update (empty batches included).
- The noise multiplier is calibrated once, for the whole planned training: every round and local
  epoch the hospital may run (`TrainingPlan.total_steps`), not per round. Rounds where the hospital
  is not sampled only make the real epsilon smaller than planned.
- The accountant's history lives in the ledger file the hospital keeps; it is restored before each
  local training and saved after, so epsilon is cumulative across rounds and process restarts.
- The server and other hospitals see only the noised model updates (post-processing), and cannot
  predict the noise or the sampling: both come from the OS's CSPRNG (`randomness`), unless
  `privacy.reproducible_noise` (test only) voids the guarantee, which every record then says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import get_privacy_spent as rdp_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from fedgen.config import ConfigError, PrivacyConfig
from fedgen.group_privacy import composed_rdp
from fedgen.privacy.randomness import NO_GUARANTEE

LEDGER_VERSION = 2  # 2: each file carries the sha256 of its content


class LedgerError(RuntimeError):
    """A hospital's ledger file cannot be read: training stops rather than restart at epsilon 0."""


class BudgetExceededError(RuntimeError):
    """Training further would spend more epsilon than the hospital's budget allows."""


@dataclass(frozen=True)
class TrainingPlan:
    """What one hospital plans to run: Poisson rate q and the number of noisy steps."""

    num_examples: int
    sample_rate: float
    steps_per_epoch: int
    local_epochs: int
    num_rounds: int

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.local_epochs

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.num_rounds


def make_plan(num_examples: int, batch_size: int, local_epochs: int, num_rounds: int) -> TrainingPlan:
    """q = batch_size / N and ceil(1/q) Poisson steps per epoch (one epoch in expectation)."""
    if num_examples <= 0:
        raise ConfigError("data: the hospital's training set is empty; nothing to train on")
    if batch_size > num_examples:  # q above 1: no Poisson sampling, and no accounting that holds
        raise ConfigError(f"training.batch_size: {batch_size} is more than a silo's {num_examples} training "
                          f"images (sampling rate q = batch_size / N must be <= 1); use <= {num_examples}")
    q = batch_size / num_examples
    return TrainingPlan(num_examples, q, math.ceil(1.0 / q), local_epochs, num_rounds)


def check_delta(delta: float, num_examples: int) -> None:
    """delta must be below 1/N: at delta >= 1/N, 'release one random record' would satisfy DP."""
    if not delta < 1.0 / num_examples:
        raise ConfigError(
            f"privacy.delta: {delta:g} is not below 1/N = {1.0 / num_examples:.3g} for a silo of "
            f"{num_examples} training images; choose a smaller delta"
        )


def calibrate_noise(cfg: PrivacyConfig, plan: TrainingPlan) -> float:
    """Noise multiplier sigma that spends exactly (at most) the target epsilon over the whole plan."""
    check_delta(cfg.delta, plan.num_examples)
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
        planned = epsilon_of([(sigma, plan.sample_rate, plan.total_steps)], cfg.accountant, cfg.delta)
        if planned > cfg.target_epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier: {sigma:g} over {plan.total_steps} planned steps spends "
                f"epsilon {planned:.3f}, above privacy.target_epsilon {cfg.target_epsilon:g}"
            )
        return sigma
    try:
        return _noise_multiplier(float(cfg.target_epsilon), float(cfg.delta), plan.sample_rate, plan.total_steps,
                                 cfg.accountant)
    except ValueError as err:
        raise ConfigError(
            f"privacy.target_epsilon: {cfg.target_epsilon:g} cannot be reached over "
            f"{plan.total_steps} steps at q={plan.sample_rate:.3g} ({err})"
        ) from err


# Both below are pure and slow (Opacus's RDP at fractional orders: about 0.2 s an epsilon, 3 s a
# calibration), and a simulated worker serving many hospitals asks for the same ones again and
# again (benchmarks/scale.py: most of a 100-hospital round went here). Cached per process.
@lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    with warnings.catch_warnings():
        # The binary search probes huge sigmas whose optimal RDP order is at the grid's edge.
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))


def epsilon_of(history: list[tuple[float, float, int]], accountant: str, delta: float) -> float:
    """Epsilon at delta of a composition [(sigma, q, steps), ...] under an Opacus accountant."""
    if not history:
        return 0.0
    return _epsilon_of(tuple((float(s), float(q), int(n)) for s, q, n in history), accountant, float(delta))


@lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], accountant: str, delta: float) -> float:
    if accountant == "rdp":  # Opacus's RDPAccountant.get_epsilon, each (sigma, q) computed once
        orders = RDPAccountant.DEFAULT_ALPHAS
        return float(rdp_privacy_spent(orders=orders, rdp=composed_rdp(list(history), orders), delta=delta)[0])
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _content_hash(ledger: dict) -> str:
    """sha256 of a ledger's JSON without its own checksum (canonical: sorted keys)."""
    content = {k: v for k, v in ledger.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass
class EpsilonLedger:
    """A hospital's running privacy account: the plan it committed to and every step it released.

    Saved as a small JSON file the hospital keeps (`save`/`load`). `history` is the Opacus
    accountant's state: [(noise_multiplier, sample_rate, steps), ...].
    """

    accountant: str
    delta: float
    budget: float  # target epsilon: training past it is refused
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # per local training: round, steps, epsilon

    @classmethod
    def start(cls, cfg: PrivacyConfig, plan: TrainingPlan) -> EpsilonLedger:
        return cls(
            accountant=cfg.accountant,
            delta=cfg.delta,
            budget=cfg.target_epsilon,
            noise_multiplier=calibrate_noise(cfg, plan),
            sample_rate=plan.sample_rate,
            planned_steps=plan.total_steps,
        )

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.accountant, self.delta)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon if `extra_steps` more steps at the planned (sigma, q) were released."""
        extra = [(self.noise_multiplier, self.sample_rate, extra_steps)] if extra_steps else []
        return epsilon_of(self.history + extra, self.accountant, self.delta)

    def check_budget(self, next_steps: int) -> None:
        """Refuse, before any step, to run a local training that would cross the budget."""
        after = self.epsilon_after(next_steps)
        # The calibration's binary search tolerance (0.01) keeps the plan itself inside the budget.
        if after > self.budget + 1e-9:
            raise BudgetExceededError(
                f"privacy budget exhausted: {self.steps} steps spent epsilon {self.epsilon:.3f}; "
                f"{next_steps} more would reach {after:.3f} > budget {self.budget:g} "
                f"(delta {self.delta:g}). Refusing to train."
            )

    def check_plan(self, cfg: PrivacyConfig, plan: TrainingPlan) -> None:
        """A restored ledger must belong to the same plan: a changed budget, delta, accountant or
        sampling rate would make the recorded composition and the next steps disagree."""
        for name, mine, theirs in (
            ("privacy.target_epsilon", self.budget, cfg.target_epsilon),
            ("privacy.delta", self.delta, cfg.delta),
            ("data (sample rate q = batch/N)", self.sample_rate, plan.sample_rate),
        ):
            if not math.isclose(mine, theirs, rel_tol=1e-9):
                raise ConfigError(
                    f"{name}: the hospital's ledger was started with {mine:g}, the config now "
                    f"says {theirs:g}. Epsilon already spent cannot be re-planned; start a new run."
                )
        if self.accountant != cfg.accountant:
            raise ConfigError(
                f"privacy.accountant: ledger uses '{self.accountant}', config says '{cfg.accountant}'"
            )

    def make_accountant(self) -> IAccountant:
        """A fresh Opacus accountant that continues from this ledger's history."""
        acc = create_accountant(self.accountant)
        acc.history = [tuple(h) for h in self.history]
        return acc

    def record(self, accountant: IAccountant, server_round: int, steps: int, reproducible_noise: bool) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        self.rounds.append(
            {"round": server_round, "steps": steps, "epsilon": self.epsilon, "reproducible_noise": reproducible_noise}
        )

    @property
    def reproducible_noise(self) -> bool:
        """True when any recorded training drew its noise from the config's seed: the epsilon is
        then no guarantee. Rounds recorded before secret noise existed were all reproducible."""
        return any(r.get("reproducible_noise", True) for r in self.rounds)

    @property
    def trained_rounds(self) -> list[int]:
        return [int(r["round"]) for r in self.rounds]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = LEDGER_VERSION
        d["epsilon"] = self.epsilon
        d["steps"] = self.steps
        d["guarantee"] = NO_GUARANTEE if self.reproducible_noise else "secret noise and sampling"
        d["sha256"] = _content_hash(d)
        return d

    def save(self, path: str | Path) -> None:
        """Atomic write (temp file + rename): a crash mid-save never leaves a truncated ledger."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> EpsilonLedger:
        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("version") not in (1, LEDGER_VERSION):
                raise ValueError(f"unknown ledger version {raw.get('version')}")
            # Version 1 predates checksums; from version 2 an edited ledger does not verify.
            if raw["version"] > 1 and raw.get("sha256") != _content_hash(raw):
                raise ValueError("its sha256 does not match its content: it was edited or damaged")
            return cls._from_dict(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(
                f"{path}: the epsilon ledger is unreadable ({err}). Refusing to train: the epsilon "
                "already spent would be lost. Restore the file; never delete it to start over."
            ) from err

    @classmethod
    def _from_dict(cls, raw: dict) -> EpsilonLedger:
        return cls(
            accountant=raw["accountant"],
            delta=raw["delta"],
            budget=raw["budget"],
            noise_multiplier=raw["noise_multiplier"],
            sample_rate=raw["sample_rate"],
            planned_steps=raw["planned_steps"],
            history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
            rounds=list(raw.get("rounds", [])),
        )

    @classmethod
    def open(cls, path: str | Path, cfg: PrivacyConfig, plan: TrainingPlan) -> EpsilonLedger:
        """Continue the ledger at `path` if the hospital has one, else start one for this plan."""
        if Path(path).exists():
            ledger = cls.load(path)
            ledger.check_plan(cfg, plan)
            return ledger
        return cls.start(cfg, plan)
