"""Group privacy for DP-SGD: what an example-level guarantee implies for k examples at once (a
patient's several images, an image duplicated k times).

RDP group privacy (Mironov 2017, Proposition 2): a mechanism that is (alpha, e(alpha))-RDP is, for
groups of 2^c examples, (alpha / 2^c, 3^c e(alpha))-RDP whenever alpha >= 2^(c+1). A group of k
is at most 2^c with c = ceil(log2 k); the group's RDP curve, at orders beta >= 2, is converted to
(epsilon, delta) as Opacus's RDP accountant does. Pure accounting arithmetic: the privacy card and
the attacks' alarms (which may not import training code) both use it.
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

# Orders of the group's RDP curve: Opacus's defaults from 2 up (the group bound needs beta >= 2),
# so a group of one is never below the example-level epsilon.
GROUP_ORDERS = [a for a in RDPAccountant.DEFAULT_ALPHAS if a >= 2]


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
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, q, steps in history)
    return [3**c * float(r) for r in rdp] if history else [0.0] * len(GROUP_ORDERS)
