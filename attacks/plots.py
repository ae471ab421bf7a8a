"""Figures of an audit: ROC curves on log-log axes (Carlini et al. 2022) and copy pairs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attacks.metrics import AttackResult  # noqa: E402


def roc_figure(results: dict[str, AttackResult], title: str = "membership inference"):
    """Log-log ROC of every attack, with the chance line: low-FPR behaviour is what matters."""
    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1.0 / max(max(r.num_nonmembers for r in results.values()), 1)
    for name, r in results.items():
        fpr = np.clip(np.asarray(r.roc.fpr), floor / 2, 1)
        tpr = np.clip(np.asarray(r.roc.tpr), floor / 2, 1)
        ax.plot(fpr, tpr, label=f"{name} (AUC {r.auc:.3f}, TPR@1% {r.tpr_at_1pct_fpr:.2f})")
    grid = np.logspace(np.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
