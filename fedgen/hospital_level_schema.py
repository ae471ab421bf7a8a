"""The schema of `privacy.hospital_level` and its checks (kept out of `fedgen.config`, which is at
its size limit; `fedgen.config` imports both and raises its ConfigError on a problem).

Hospital-level DP is the coordinator's guarantee (DP-FedAvg, McMahan et al. 2018): it protects
whether a hospital took part at all, and its whole silo, in everything the global models reveal.
The algorithm and its assumptions: `fedgen.privacy.hospital_level`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class HospitalLevelConfig:
    enabled: bool = False
    target_epsilon: float = 8.0  # the budget over all planned rounds (federation.num_rounds)
    delta: float = 1e-3  # must be below 1 / federation.num_hospitals
    clipping_norm: float = 1.0  # L2 bound C on one hospital's update (its new weights - the global ones)
    sample_rate: float = 1.0  # q_h: each hospital is in a round independently with this probability
    noise_multiplier: float | None = None  # set to skip calibration; must still fit the budget


def hospital_level_problems(h: HospitalLevelConfig, num_hospitals: int, strategy: str, fraction_train: float,
                            secure_aggregation: bool, accountant: str) -> list[tuple[str, str]]:
    """(setting, why it cannot work) for each impossible setting; none when disabled."""
    if not h.enabled:
        return []
    key = "privacy.hospital_level"
    checks = [
        (0.0 < h.sample_rate <= 1.0, f"{key}.sample_rate", f"q_h must be in (0, 1], got {h.sample_rate}"),
        (h.target_epsilon > 0 and math.isfinite(h.target_epsilon), f"{key}.target_epsilon",
         f"must be a positive finite number, got {h.target_epsilon}"),
        (0.0 < h.delta < 1.0 / num_hospitals, f"{key}.delta",
         f"{h.delta:g} is not in (0, 1/num_hospitals = {1.0 / num_hospitals:.3g}): at delta >= 1/n, "
         "'release one random hospital's update' would satisfy DP; choose a smaller delta"),
        (h.clipping_norm > 0 and math.isfinite(h.clipping_norm), f"{key}.clipping_norm",
         f"must be a positive finite number, got {h.clipping_norm}"),
        (h.noise_multiplier is None or h.noise_multiplier > 0, f"{key}.noise_multiplier",
         f"must be > 0 (or null to calibrate), got {h.noise_multiplier}"),
        (accountant in ("rdp", "prv"), "privacy.accountant", f"unknown '{accountant}' (hospital-level DP uses it too)"),
        (not secure_aggregation, "federation.secure_aggregation",
         "hospital-level DP clips each hospital's update at the coordinator, which secure aggregation "
         "hides (it sees only the sum); turn one of them off"),
        (strategy in ("fedavg", "fedprox"), "federation.strategy",
         f"hospital-level DP aggregates by DP-FedAvg (fedavg or fedprox), not '{strategy}'"),
        (fraction_train == 1.0, "federation.fraction_train",
         f"hospital-level DP samples hospitals itself (privacy.hospital_level.sample_rate, Poisson); "
         f"leave fraction_train at 1, got {fraction_train:g}"),
    ]
    return [(setting, message) for ok, setting, message in checks if not ok]
