"""A run's privacy card (`privacy.json`): enough for anyone to recompute every epsilon it states.

Per hospital: the unit protected, (epsilon, delta), the accountant, and the whole composition
[(noise multiplier sigma, Poisson sampling rate q, steps), ...] it spent, plus what the
example-level guarantee implies for the silo's largest patient (the patient with the most
training images, duplicates included).

The patient figure is computed, not the k x epsilon rule of thumb: RDP group privacy (Mironov
2017, Proposition 2): a mechanism that is (alpha, e(alpha))-RDP is, for groups of 2^c examples,
(alpha / 2^c, 3^c e(alpha))-RDP whenever alpha >= 2^(c+1). A patient with k images is a group of
at most 2^c with c = ceil(log2 k); the group's RDP curve, at orders beta >= 2, is converted to
(epsilon, delta) as the accountant does. It uses the RDP curve even when the run's accountant is
PRV (the card says so).
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedgen.privacy.accounting import epsilon_of

# Orders of the group's RDP curve: Opacus's defaults from 2 up (the group bound needs beta >= 2),
# so a group of one is never below the example-level epsilon.
GROUP_ORDERS = [a for a in RDPAccountant.DEFAULT_ALPHAS if a >= 2]
CARD_VERSION = 1


def group_epsilon(history: list[tuple[float, float, int]], group_size: int, delta: float) -> float:
    """Epsilon at `delta` for a group of `group_size` examples under DP-SGD's composition `history`."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not history:
        return 0.0
    c = math.ceil(math.log2(group_size)) if group_size > 1 else 0
    orders = [2**c * beta for beta in GROUP_ORDERS]
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, q, steps in history)
    epsilon, _ = get_privacy_spent(orders=GROUP_ORDERS, rdp=[3**c * r for r in rdp], delta=delta)
    return float(epsilon)


def hospital_card(ledger: dict, accountant: str, unit: str = "example") -> dict:
    """One hospital's entry from the coordinator's record of its ledger (`Coordinator.ledgers`)."""
    history = [(float(s), float(q), int(n)) for s, q, n in ledger["history"]]
    delta = float(ledger["delta"])
    # Patient-level DP protects a whole patient at epsilon: the group is one unit.
    largest = int(ledger.get("largest_patient", 1)) if unit == "example" else 1
    return {
        "unit": "patient (all of one patient's training images)" if unit == "patient" else "example (one training image)",
        "epsilon": ledger["epsilon"],
        "epsilon_recomputed": epsilon_of(history, accountant, delta),
        "delta": delta,
        "accountant": accountant,
        "sampling": "Poisson, rate q per example per step",
        "history": [list(h) for h in history],
        "steps": sum(n for _, _, n in history),
        "reproducible_noise": bool(ledger.get("reproducible_noise", True)),
        "largest_patient_images": largest,
        "largest_patient_epsilon": group_epsilon(history, largest, delta),
        "largest_patient_method": "RDP group privacy (Mironov 2017, Prop. 2) on the RDP curve",
    }


def privacy_card(enabled: bool, accountant: str, ledgers: dict, unit: str = "example") -> dict:
    if not enabled:
        return {"version": CARD_VERSION, "dp": False, "hospitals": {}}
    return {
        "version": CARD_VERSION,
        "dp": True,
        "level": f"{unit}-level DP-SGD at each hospital (no hospital-level noise)",
        "hospitals": {h: hospital_card(v, accountant, unit) for h, v in ledgers.items() if v.get("history")},
    }
