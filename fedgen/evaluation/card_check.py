"""A finished run's privacy card (`privacy.json`) checked against itself and the run's budget:
every hospital has an entry, each epsilon recomputes from the entry's own history, none passes
`privacy.target_epsilon`, and each spent the planned rounds, no more, no fewer (no hospital left
out or double-counted). `benchmarks/scale.py` reports it; `tests/test_simulation.py` asserts it.
"""

from __future__ import annotations

from pathlib import Path

from fedgen.run_dir import RunDir, read_json


def card_problems(run: str | Path, hospitals: int, rounds: int) -> list[str]:
    """What is wrong with the privacy card of the run in `run`, which trained `hospitals`
    hospitals (numbered 0 to hospitals - 1) for `rounds` rounds; [] when nothing is."""
    run_dir = RunDir(run)
    if not run_dir.privacy_card.exists():
        return ["no privacy.json"]
    entries, problems = read_json(run_dir.privacy_card)["hospitals"], []
    if sorted(entries, key=int) != [str(h) for h in range(hospitals)]:
        problems.append(f"ledgers for {len(entries)} of {hospitals} hospitals")
    budget = run_dir.experiment_config().privacy.target_epsilon
    for h, entry in entries.items():
        if abs(entry["epsilon"] - entry["epsilon_recomputed"]) > 1e-9:
            problems.append(f"hospital {h}: epsilon {entry['epsilon']} but recomputed {entry['epsilon_recomputed']}")
        if entry["epsilon"] > budget + 1e-9:
            problems.append(f"hospital {h}: epsilon {entry['epsilon']} over the budget {budget}")
        if entry["steps"] != sum(steps for *_, steps in entry["history"]) or len(entry["history"]) != rounds:
            problems.append(f"hospital {h}: {entry['steps']} steps over {len(entry['history'])} rounds")
    return problems
