"""Group privacy for DP-SGD: what an example-level guarantee implies for k examples at once (a
patient's several images, an image duplicated k times).

RDP group privacy (Mironov 2017, Proposition 2): a mechanism that is (alpha, e(alpha))-RDP is, for
groups of 2^c examples, (alpha / 2^c, 3^c e(alpha))-RDP whenever alpha >= 2^(c+1). A group of k
is at most 2^c with c = ceil(log2 k); the group's RDP curve, at orders beta >= 2, is converted to
(epsilon, delta) as Opacus's RDP accountant does. Pure accounting arithmetic: the privacy card and
the attacks' alarms (which may not import training code) both use it.

`composed_rdp` is the RDP curve of a composition, as Opacus's RDP accountant sums it, with each
(sigma, q)'s curve computed once per process: at fractional orders Opacus takes about 0.2 s per
(sigma, q, steps), and a site's lifetime ledger composes every run ever made on its patients,
three times a round (`fedgen.privacy.lifetime`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

# Orders of the group's RDP curve: Opacus's defaults from 2 up (the group bound needs beta >= 2),
# so a group of one is never below the example-level epsilon.
GROUP_ORDERS = [a for a in RDPAccountant.DEFAULT_ALPHAS if a >= 2]


@lru_cache(maxsize=1024)
def _one_step_rdp(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    rdp.setflags(write=False)  # shared by every caller
    return rdp


def composed_rdp(history: list[tuple[float, float, int]], orders: list[float]) -> np.ndarray:
    """RDP at `orders` of the composition [(sigma, q, steps), ...]: bit for bit Opacus's
    `sum(compute_rdp(q, sigma, steps, orders) ...)`, which is the one-step curve times steps."""
    key = tuple(orders)
    return sum([_one_step_rdp(float(sigma), float(q), key) * steps for sigma, q, steps in history])


def group_epsilon(history: list[tuple[float, float, int]], group_size: int, delta: float) -> float:
    """Epsilon at `delta` for a group of `group_size` examples under DP-SGD's composition `history`."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not history:
        return 0.0
    epsilon, _ = get_privacy_spent(orders=GROUP_ORDERS, rdp=group_rdp(history, group_size), delta=delta)
    return float(epsilon)


def group_rdp(history: list[tuple[float, float, int]], group_size: int) -> list[float]:
    """The RDP curve at GROUP_ORDERS of a group of `group_size` examples under `history`."""
    c = math.ceil(math.log2(group_size)) if group_size > 1 else 0
    orders = [2**c * beta for beta in GROUP_ORDERS]
    rdp = composed_rdp(history, orders)
    return [3**c * float(r) for r in rdp] if history else [0.0] * len(GROUP_ORDERS)
