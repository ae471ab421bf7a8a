"""How numbers and tables look in fedgen's Markdown: `fmt` for every number, `markdown_table`,
and the sweep's table (`sweep_table`), which a sweep's report.md and its TensorBoard text both show.
"""

from __future__ import annotations

import math
from pathlib import Path


def fmt(value, digits: int = 3) -> str:
    """How every number appears in a report: 3 significant digits, "n/a" when unknown."""
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    if isinstance(value, bool | int):
        return str(value)
    x = float(value)
    return f"{x:.{digits}g}" if math.isfinite(x) else "n/a"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: a header row, the separator, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# The sweep's columns: row field -> column title.
SWEEP_COLUMNS = [
    ("setting", "setting"),
    ("target_epsilon", "target epsilon"),
    ("epsilon", "achieved epsilon"),
    ("noise_multiplier", "noise multiplier"),
    ("val_loss", "val loss"),
    ("frechet_distance", "FD"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("downstream_auc", "downstream AUC"),
    ("attack_auc", "best attack AUC"),
    ("tpr_at_1pct_fpr", "TPR@1%FPR"),
    ("epsilon_lb", "epsilon lower bound"),
]


def sweep_table(rows: list[dict], links: bool = True) -> str:
    """One line per run of a sweep; with `links`, each setting links to its run's report.md."""
    body = []
    for r in rows:
        cells = [fmt(r.get(key)) for key, _ in SWEEP_COLUMNS]
        if r.get("privacy") == "none":
            cells[1] = cells[2] = "no DP"
        if links and r.get("path") and (Path(r["path"]) / "report.md").exists():
            cells[0] = f"[{r['setting']}]({r['setting']}/report.md)"
        if r.get("status") == "failed":
            cells[0] += " (failed)"
        body.append(cells)
    return markdown_table([title for _, title in SWEEP_COLUMNS], body)
