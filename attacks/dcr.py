"""Distance to the closest record (DCR) as a membership score, for a release of samples.

Where the release is images rather than weights (private selection draws the public base's samples,
`fedgen select`), the attacker scores each candidate by its distance to the nearest released
sample: a member should lie nearer than a held-out patient does. A release of the training images
themselves scores near 1 (README, private selection).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve


def dcr_scores(released: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    """Minus each candidate's L2 distance to its nearest released sample (higher: more member-like)."""
    flat = released.reshape(len(released), -1).float()
    return (-torch.cdist(candidates.reshape(len(candidates), -1).float(), flat).min(dim=1).values).numpy()


def dcr_attack(released: torch.Tensor, members: torch.Tensor, heldout: torch.Tensor) -> dict:
    """AUC and TPR at 1% FPR of DCR on members vs held-out patients."""
    if len(released) == 0 or len(members) == 0 or len(heldout) == 0:
        raise ValueError(f"need released samples, members and held-out images; got {len(released)}, "
                         f"{len(members)}, {len(heldout)}")
    score = np.r_[dcr_scores(released, members), dcr_scores(released, heldout)]
    labels = np.r_[np.ones(len(members)), np.zeros(len(heldout))]
    fpr, tpr, _ = roc_curve(labels, score)
    return {"dcr_auc": float(roc_auc_score(labels, score)), "dcr_tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr))}
