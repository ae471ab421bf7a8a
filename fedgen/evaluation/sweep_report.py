"""A sweep's privacy report in Markdown, for a reader who runs nothing (a hospital's privacy
officer), as `report` is a run's.

`write_sweep_report(sweep, rows)` -> `<sweep>/report.md`: the runs of a sweep side by side, the
trade-off figure and a link to each run's report (`report.write_run_report`). The rows are
`comparison.run_row`'s; formatting is `markdown.fmt`.
"""

from __future__ import annotations

from pathlib import Path

from fedgen.evaluation.comparison import shared_value
from fedgen.evaluation.markdown import fmt, sweep_table
from fedgen.evaluation.report import UTILITY_DOC


def _sweep_references(rows: list[dict]) -> str:
    """The ends of the utility scale, shared by every run: real images and the untrained model."""
    keys = ("frechet_distance_real", "val_loss_untrained", "frechet_distance_untrained")
    first = {key: shared_value(rows, key) for key in keys}
    if all(v is None for v in first.values()):
        return ""
    return (
        f"For scale: real training images score FD {fmt(first['frechet_distance_real'])} (the floor); "
        f"the untrained model every run started from scores val loss {fmt(first['val_loss_untrained'])} "
        f"and FD {fmt(first['frechet_distance_untrained'])} (nothing learned). A run near the untrained "
        "model learned little, and attacks that find nothing in it prove little."
    )


def write_sweep_report(
    sweep_dir: str | Path, rows: list[dict], common: list[str], command: str
) -> Path:
    sweep_dir = Path(sweep_dir)
    failed = [r for r in rows if r.get("status") == "failed"]
    parts = [
        f"# Privacy budgets compared: {sweep_dir.name}",
        f"{len(rows)} federations that differ only in their privacy setting: the same hospitals, the "
        "same patients in the same roles, the same seeds. Each trained, then its released model was "
        "attacked and its samples measured against images it never saw. "
        f"Settings shared by every run: `{' '.join(common) or '(defaults)'}`. Command: `{command}`.",
        sweep_table(rows),
    ]
    references = _sweep_references(rows)
    if references:
        parts.append(references)
    if (sweep_dir / "tradeoff.png").exists():
        parts.append(
            "![privacy/utility trade-off](tradeoff.png)\n\nLeft axis: utility (lower is better). "
            "Right axis: the strongest membership attack's AUC (0.5 = guessing). "
            "Each run's report (linked in the table) says what was trained, the guarantee and the attacks."
        )
    if failed:
        parts.append(
            "## Failed runs\n\n"
            + "\n".join(f"- {r['setting']} ({r.get('step')}): {r.get('error')}" for r in failed)
        )
    parts.append(
        "\n".join(
            [
                "## Reading the comparison",
                "",
                "- epsilon: the accountant's guarantee per training image (largest over hospitals); smaller is stronger.",
                "- val loss, FD, precision, recall, downstream AUC: image quality on images no run trained on "
                f"({UTILITY_DOC}).",
                "- best attack AUC, TPR@1%FPR, epsilon lower bound: what the strongest membership attack found "
                "(largest over attacks); the lower bound must stay below epsilon.",
                "- A small sweep (few images, few rounds) gives noisy numbers: compare trends, not the third digit.",
            ]
        )
    )
    path = sweep_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
