"""`fedgen budget <site dir, runs dir or data-dir>`: what each hospital site spent on its patients,
per run and over its lifetime (`fedgen.privacy.lifetime`), and what its lifetime budget leaves."""

from __future__ import annotations

import math
from pathlib import Path

from fedgen.config import ConfigError
from fedgen.privacy.lifetime import LIFETIME_FILE, SiteLedger, lifetime_spend, spent_history


def find_sites(path: str | Path) -> list[Path]:
    """The lifetime ledgers under `path`: a site dir (its lifetime.json), a deployed data-dir
    (fedgen/lifetime.json), a runs dir or sweep folder (sites/*/lifetime.json), or the file itself."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    found = [p for p in (path / LIFETIME_FILE, path / "fedgen" / LIFETIME_FILE) if p.is_file()]
    found += sorted((path / "sites").glob(f"*/{LIFETIME_FILE}"))
    if not found:
        raise ConfigError(f"{path}: no hospital lifetime ledger here ({LIFETIME_FILE}, fedgen/{LIFETIME_FILE} "
                          f"or sites/*/{LIFETIME_FILE}); give a site dir, a runs dir or a data-dir")
    return found


def _eps(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "inf"


def site_table(path: Path, budget: float | None = None) -> tuple[list[str], dict]:
    """Lines of one site's table, and its totals. Every run's epsilon is stated alone at the
    site's lifetime delta and unit, so the column and the total read on one scale."""
    entries = SiteLedger.load(path).entries
    spend = lifetime_spend(list(entries.values()))
    if budget is None:
        recorded = [e["lifetime_budget"] for e in sorted(entries.values(), key=lambda e: e.get("updated", 0))
                    if e.get("lifetime_budget") is not None]
        budget = recorded[-1] if recorded else None
    hospitals = sorted({str(e.get("hospital", "?")) for e in entries.values()})
    lines = [f"site {path.parent} (hospital {', '.join(hospitals)}): {spend.unit}-level, delta {spend.delta:g}",
             f"  {'run':<24} {'steps':>7} {'epsilon':>9}"]
    for run, e in sorted(entries.items(), key=lambda item: item[1].get("updated", 0)):
        steps = sum(n for _, _, n in spent_history(e))
        alone = lifetime_spend([e], spend.delta if e.get("dp", True) else None)
        note = " (no DP)" if not e.get("dp", True) else (" (round in progress)" if e.get("reserved") else "")
        lines.append(f"  {str(e.get('name', run)):<24} {steps:>7} {_eps(alone.epsilon):>9}{note}")
    total = sum(sum(n for _, _, n in spent_history(e)) for e in entries.values())
    left = "" if budget is None else f" | budget {budget:g}, left {_eps(max(0.0, budget - spend.epsilon))}"
    lines.append(f"  {'lifetime (' + str(len(entries)) + ' runs)':<24} {total:>7} {_eps(spend.epsilon):>9}{left}")
    return lines, {"site": str(path.parent), "hospitals": hospitals, "epsilon": spend.epsilon,
                   "delta": spend.delta, "unit": spend.unit, "budget": budget, "runs": len(entries)}


def budget_report(path: str | Path, budget: float | None = None) -> tuple[list[str], list[dict]]:
    lines, totals = [], []
    for site in find_sites(path):
        table, summary = site_table(site, budget)
        lines += table
        totals.append(summary)
    return lines, totals


def main(path: str, budget: float | None = None) -> int:
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"--budget: must be a positive finite number, got {budget}")
    lines, _ = budget_report(path, budget)
    print("\n".join(lines))
    return 0
