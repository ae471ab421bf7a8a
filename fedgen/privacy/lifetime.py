"""A hospital site's lifetime ledger (`lifetime.json`): everything spent on its patients, across runs.

Each run's own ledger (`accounting.EpsilonLedger`) counts one run. A hospital that joins run after
run on the same patients spends more each time: this file keeps one entry per run, and the
lifetime epsilon is their composition.

Where it lives: simulated hospitals under `<runs_dir>/sites/<fingerprint>/lifetime.json`, the
fingerprint being that of the hospital's own data (`site_fingerprint`), so every run on the same
silo shares it; a deployed site under `<data-dir>/fedgen/lifetime.json`, whatever the run.

Decisions, stated once:
- Composition: RDP. Every entry's [(sigma, q, steps)] history adds at each order (a run is one
  more adaptive composition on the same patients); converted to (epsilon, delta) as Opacus's RDP
  accountant does, whatever accountant each run reported with.
- Delta: the lifetime epsilon is stated at the smallest delta of any run on the ledger (the run
  about to start included). RDP converts at any delta; the smallest keeps the lifetime statement
  as strong as the strongest run's, and needs no setting of its own.
- Units: runs of one unit (example, or patient) compose in that unit. Mixed, the lifetime is
  stated per patient: each example-level run enters by RDP group privacy (Mironov 2017, Prop. 2)
  for its largest patient's image count, as `fedgen.group_privacy` does, on orders >= 2.
- A run without DP spends an unbounded epsilon: its entry makes the lifetime epsilon infinite.
- Writes: each entry is written by the hospital before a round trains (the round's steps
  reserved) and after (what its run ledger holds), so a crash mid-round still counts; atomic
  (temp file + rename), under a file lock, with the sha256 of the content like the run ledger.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from opacus.accountants.analysis.rdp import get_privacy_spent

from fedgen.config import ExperimentConfig
from fedgen.group_privacy import GROUP_ORDERS, group_rdp
from fedgen.privacy.accounting import BudgetExceededError, LedgerError, epsilon_of

LIFETIME_VERSION = 1
LIFETIME_FILE = "lifetime.json"


class LifetimeBudgetError(BudgetExceededError):
    """The run's planned spend would take the site's lifetime epsilon past privacy.lifetime_budget."""


def site_fingerprint(patient_ids, source: str) -> str:
    """16 hex digits naming a simulated hospital's data set: its data source and the sorted set of
    all its patients (members, held-out and validation). The same silo under another split, image
    size or privacy setting is the same patients, hence the same ledger."""
    h = hashlib.sha256(f"fedgen-site-v1\n{source}\n".encode())
    h.update("\n".join(sorted({str(p) for p in patient_ids})).encode())
    return h.hexdigest()[:16]


def simulated_site(runs_dir: str | Path, fingerprint: str) -> Path:
    return Path(runs_dir).expanduser().resolve() / "sites" / fingerprint


def largest_patient(patient_ids) -> int:
    """Training images of the patient with the most (duplicates included)."""
    counts: dict[str, int] = {}
    for p in patient_ids:
        counts[str(p)] = counts.get(str(p), 0) + 1
    return max(counts.values(), default=1)


def run_entry(cfg: ExperimentConfig, hospital: int, data: str, largest: int, planned_steps: int,
              history: list, reserved: list | None = None, budget: float | None = None) -> dict:
    """One run's entry: what it spent (`history`), the round it is running (`reserved`), and what
    anyone needs to recompute its epsilon (unit, delta, largest patient for group privacy)."""
    p = cfg.privacy
    return {
        "name": cfg.name, "hospital": hospital, "data": data, "dp": bool(p.enabled),
        "unit": p.unit if p.enabled else "example", "accountant": p.accountant, "delta": p.delta,
        "history": [[float(s), float(q), int(n)] for s, q, n in history],
        "reserved": [[float(s), float(q), int(n)] for s, q, n in reserved or []],
        "planned_steps": int(planned_steps), "largest_patient": int(largest),
        "reproducible_noise": bool(p.enabled and p.reproducible_noise),
        "lifetime_budget": budget,  # the lifetime budget this run was checked against (None: none)
    }


def lifetime_budget(cfg: ExperimentConfig, site_budget: float | None = None) -> float | None:
    """The tighter of the run's `privacy.lifetime_budget` and the site's own (None: no limit)."""
    budgets = [b for b in (cfg.privacy.lifetime_budget, site_budget) if b is not None]
    return min(budgets) if budgets else None


def _content_hash(raw: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in raw.items() if k != "sha256"}, sort_keys=True).encode()).hexdigest()


def spent_history(entry: dict) -> list[tuple[float, float, int]]:
    """An entry's composition: what its run spent plus the round in progress it reserved."""
    return [(float(s), float(q), int(n)) for s, q, n in [*entry.get("history", []), *entry.get("reserved", [])]]


def _rdp_in_patients(entry: dict) -> list[float]:
    """An entry's RDP curve per patient at GROUP_ORDERS: example-level runs by group privacy."""
    k = int(entry.get("largest_patient", 1)) if entry.get("unit", "example") == "example" else 1
    return group_rdp(spent_history(entry), k)


@dataclass(frozen=True)
class LifetimeSpend:
    epsilon: float
    delta: float
    unit: str  # example | patient (mixed units are stated per patient)
    runs: int


def lifetime_spend(entries: list[dict], delta: float | None = None) -> LifetimeSpend:
    """The composition of `entries`, at `delta` (default: the smallest delta among them)."""
    dp = [e for e in entries if e.get("dp", True)]
    deltas = [float(e["delta"]) for e in dp]
    delta = float(delta) if delta is not None else min(deltas, default=0.0)
    units = {e.get("unit", "example") for e in entries}
    unit = units.pop() if len(units) == 1 else "patient"
    if len(dp) < len(entries):
        return LifetimeSpend(math.inf, delta, unit, len(entries))
    histories = [h for e in dp for h in spent_history(e)]
    if not histories:
        return LifetimeSpend(0.0, delta, unit, len(entries))
    if len({e.get("unit", "example") for e in dp}) == 1:
        epsilon = epsilon_of(histories, "rdp", delta)
    else:
        rdp = [sum(r) for r in zip(*(_rdp_in_patients(e) for e in dp))]
        epsilon = float(get_privacy_spent(orders=GROUP_ORDERS, rdp=rdp, delta=delta)[0])
    return LifetimeSpend(epsilon, delta, unit, len(entries))


@dataclass
class SiteLedger:
    """One site's `lifetime.json`: {run key: entry}. The run key is the run's hospital home."""

    path: Path
    entries: dict[str, dict]

    @classmethod
    def load(cls, path: str | Path) -> SiteLedger:
        path = Path(path)
        if not path.exists():
            return cls(path, {})
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != LIFETIME_VERSION:
                raise ValueError(f"unknown lifetime ledger version {raw.get('version')}")
            if raw.get("sha256") != _content_hash(raw):
                raise ValueError("its sha256 does not match its content: it was edited or damaged")
            return cls(path, {str(k): dict(v) for k, v in raw["runs"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(
                f"{path}: the site's lifetime ledger is unreadable ({err}). Refusing to train: what "
                "was spent on its patients would be lost. Restore the file; never delete it to start over."
            ) from err

    def to_dict(self) -> dict:
        spend = lifetime_spend(list(self.entries.values()))
        raw = {"version": LIFETIME_VERSION, "runs": self.entries, "lifetime_epsilon": _finite(spend.epsilon),
               "lifetime_delta": spend.delta, "unit": spend.unit}
        raw["sha256"] = _content_hash(raw)
        return raw

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, self.path)

    def others(self, run: str) -> list[dict]:
        return [e for key, e in self.entries.items() if key != run]


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"  # JSON has no inf


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Exclusive lock on `<path>.lock`: two runs on the same site never lose each other's entry."""
    lock = Path(path).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_spend(path: str | Path, run: str, entry: dict) -> None:
    """Write (replace) the run's entry in the site ledger at `path`."""
    with locked(path):
        ledger = SiteLedger.load(path)
        ledger.entries[run] = {**entry, "updated": time.time()}
        ledger.save()


def check_lifetime_budget(path: str | Path, run: str, planned: dict, budget: float | None, who: str) -> None:
    """Refuse, before anything trains, a run whose full planned spend (`planned`: its entry with the
    whole plan as history) would take the site's lifetime epsilon past `budget` (None: no limit)."""
    if budget is None:
        return
    others = SiteLedger.load(path).others(run)
    after = lifetime_spend([*others, planned])
    if after.epsilon <= budget + 1e-9:
        return
    so_far = lifetime_spend(others, after.delta).epsilon
    alone = lifetime_spend([planned], after.delta).epsilon
    names = ", ".join(sorted({str(e.get("name", "?")) for e in others})) or "none"
    raise LifetimeBudgetError(
        f"{who}: lifetime budget: the site ({path}) has spent epsilon {so_far:.3f} on its patients in "
        f"{len(others)} earlier run(s) ({names}); this run's planned spend (epsilon {alone:.3f} alone, "
        f"{sum(n for _, _, n in spent_history(planned))} steps) would bring it to {after.epsilon:.3f} > "
        f"privacy.lifetime_budget {budget:g} ({after.unit}-level, delta {after.delta:g}). Refusing to train."
    )


def check_simulated_site(cfg: ExperimentConfig, silo, sample_rate: float, planned_steps: int, sigma: float) -> Path:
    """The simulation's check before any Flower process starts (the hospital checks again before
    it trains): the simulated silo's lifetime ledger, with this run's whole plan. Returns the site."""
    from fedgen.run_dir import RunDir

    site = simulated_site(cfg.runs_dir, site_fingerprint(all_patients(silo), cfg.data.source))
    home = RunDir(Path(cfg.runs_dir).expanduser() / cfg.name).hospital_home(silo.hospital)
    plan = [(sigma, sample_rate, planned_steps)] if cfg.privacy.enabled else []
    budget = lifetime_budget(cfg)
    planned = run_entry(cfg, silo.hospital, site.name, largest_patient(silo.train.patient_ids), planned_steps, plan,
                        budget=budget)
    check_lifetime_budget(site / LIFETIME_FILE, str(home), planned, budget, f"hospital {silo.hospital}")
    return site


def all_patients(silo) -> list:
    return [p for role in ("member", "heldout", "validation", "canary") for p in silo.role(role).patient_ids]


def site_summary(path: str | Path) -> dict:
    """A site ledger's totals and every run's record: enough to recompute each epsilon elsewhere."""
    ledger = SiteLedger.load(path)
    entries = list(ledger.entries.values())
    spend = lifetime_spend(entries)
    budgets = [e["lifetime_budget"] for e in sorted(entries, key=lambda e: e.get("updated", 0))
               if e.get("lifetime_budget") is not None]
    return {
        "site": str(Path(path).parent), "unit": spend.unit, "delta": spend.delta, "epsilon": _finite(spend.epsilon),
        "budget": budgets[-1] if budgets else None,  # the latest run's
        "method": "RDP composition of every run's history plus its reserved steps (a round in progress), "
                  "Opacus's RDP orders, at the smallest delta; "
                  "mixed units per patient by RDP group privacy (Mironov 2017, Prop. 2)",
        "runs": [{k: e.get(k) for k in ("name", "dp", "unit", "delta", "history", "reserved", "largest_patient")}
                 | {"run": run} for run, e in ledger.entries.items()],
    }


def run_lifetimes(run_root: str | Path) -> dict[str, dict]:
    """{hospital: its site's `site_summary`} for a simulated run (`<runs_dir>/<name>`): the sites
    under `<runs_dir>/sites/` holding one of this run's hospitals. A deployed run's sites keep
    theirs at the hospitals (`fedgen budget <data-dir>`)."""
    root = Path(run_root).resolve()
    prefix = str(root / "hospitals" / "hospital-")
    found = {}
    for path in sorted((root.parent / "sites").glob(f"*/{LIFETIME_FILE}")):
        try:
            summary = site_summary(path)
        except LedgerError as err:  # the card says so; the hospitals refuse to train on it
            summary = {"site": str(path.parent), "error": str(err), "runs": []}
        for run in summary["runs"]:
            if run["run"].startswith(prefix):  # (a selection's key ends in "#selection")
                found[run["run"][len(prefix):].split("#")[0]] = summary
    return found
