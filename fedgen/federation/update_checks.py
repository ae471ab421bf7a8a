"""Server-side checks of a hospital's model update before it is aggregated.

A broken or hostile update (NaN/Inf, wrong keys or shapes, an absurd step) is rejected with a
reason that names what is wrong; the global model is never touched by it.
"""

from __future__ import annotations

import math

import torch

StateDict = dict[str, torch.Tensor]

# Exactly what a hospital's replies report (`Hospital.train`, `Hospital.evaluate`).
TRAIN_METRIC_KEYS = frozenset({
    "hospital", "num-examples", "train-loss", "epsilon", "delta", "noise-multiplier",
    "sample-rate", "steps", "total-steps", "train-seconds", "train-cpu-seconds", "reproducible-noise",
    "largest-patient",
})
EVALUATE_METRIC_KEYS = frozenset({"hospital", "num-examples", "val-loss"})


def update_problem(global_state: StateDict, update: StateDict, max_update_norm: float) -> str | None:
    """Why `update` must be rejected, or None if it is acceptable.

    max_update_norm bounds ||update - global||_2 over all parameters (<= 0 disables the bound).
    """
    missing = sorted(set(global_state) - set(update))
    extra = sorted(set(update) - set(global_state))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, reference in global_state.items():
        value = update[name]
        if tuple(value.shape) != tuple(reference.shape):
            return f"wrong shape for {name}: {tuple(value.shape)} instead of {tuple(reference.shape)}"
        if not torch.is_floating_point(value) and value.dtype != reference.dtype:
            return f"wrong dtype for {name}: {value.dtype}"
        if torch.is_floating_point(value):
            if not torch.isfinite(value).all():
                return f"non-finite values (NaN/Inf) in {name}"
            squared += float(((value.double() - reference.double()) ** 2).sum())
    norm = squared**0.5
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
    return None


def metrics_problem(metrics: dict, num_hospitals: int) -> str | None:
    """Why a training reply's metrics must be rejected, or None. `num-examples` weighs the update
    in FedAvg, so a missing, non-finite or non-positive one would corrupt the average."""
    keys = set(metrics)
    if keys != TRAIN_METRIC_KEYS:  # Flower's FedAvg refuses replies whose metric keys differ
        return (f"wrong metrics (missing {sorted(TRAIN_METRIC_KEYS - keys)[:3]}, "
                f"unexpected {sorted(keys - TRAIN_METRIC_KEYS)[:3]})")
    hospital = metrics["hospital"]
    if not isinstance(hospital, int) or not 0 <= hospital < num_hospitals:
        return f"hospital {hospital!r} is not in [0, {num_hospitals})"
    weight = metrics["num-examples"]
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"num-examples {weight!r} is not a positive number"
    return None
