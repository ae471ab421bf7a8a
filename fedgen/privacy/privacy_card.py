"""A run's privacy card (`privacy.json`): enough for anyone to recompute every epsilon it states.

Per hospital: the unit protected, (epsilon, delta), the accountant, and the whole composition
[(noise multiplier sigma, Poisson sampling rate q, steps), ...] it spent, plus what the
example-level guarantee implies for the silo's largest patient (the patient with the most
training images, duplicates included).

The patient figure is computed, not the k x epsilon rule of thumb: RDP group privacy
(`fedgen.group_privacy`, Mironov 2017), on the RDP curve even when the run's accountant is PRV
(the card says so).
"""

from __future__ import annotations

from fedgen.group_privacy import group_epsilon
from fedgen.privacy.accounting import epsilon_of
from fedgen.privacy.hospital_level import hospital_level_card

CARD_VERSION = 1


def hospital_card(ledger: dict, accountant: str, unit: str = "example", sampling: str | None = None) -> dict:
    """One hospital's entry from the coordinator's record of its ledger (`Coordinator.ledgers`).
    `sampling`: how its units entered each step, where not DP-SGD's Poisson sampling."""
    history = [(float(s), float(q), int(n)) for s, q, n in ledger["history"]]
    delta = float(ledger["delta"])
    # Patient-level DP protects a whole patient at epsilon: the group is one unit.
    largest = int(ledger.get("largest_patient", 1)) if unit == "example" else 1
    return {
        "unit": "patient (all of one patient's training images)" if unit == "patient" else "example (one training image)",
        "epsilon": ledger["epsilon"],
        "epsilon_recomputed": epsilon_of(history, accountant, delta),
        "delta": delta,
        "accountant": accountant,
        "sampling": sampling or f"Poisson, rate q per {'patient' if unit == 'patient' else 'example'} per step",
        "history": [list(h) for h in history],
        "steps": sum(n for _, _, n in history),
        "reproducible_noise": bool(ledger.get("reproducible_noise", True)),
        "largest_patient_images": largest,
        "largest_patient_epsilon": group_epsilon(history, largest, delta),
        "largest_patient_method": "RDP group privacy (Mironov 2017, Prop. 2) on the RDP curve",
    }


def privacy_card(enabled: bool, accountant: str, ledgers: dict, unit: str = "example",
                 lifetime: dict | None = None, hospital_level: dict | None = None,
                 mechanism: str = "DP-SGD", sampling: str | None = None) -> dict:
    """`lifetime`: {hospital: its site's lifetime totals and every run's history}
    (`fedgen.privacy.lifetime.run_lifetimes`); a deployed run's sites keep theirs.
    `hospital_level`: the coordinator's ledger (`HospitalLevelDP.to_dict`) when that level is on.
    `mechanism` and `sampling` name what each hospital released, where it is not DP-SGD
    (private selection: one Gaussian release of every image's vote)."""
    lifetime = {"hospitals": lifetime or {}, "note": "what each hospital's site spent on its patients "
                "over all its runs, this one included (fedgen budget <runs dir or site>)"}
    card: dict = {"version": CARD_VERSION, "dp": False, "hospitals": {}, "lifetime": lifetime}
    if enabled:
        card.update(dp=True, hospitals={h: hospital_card(v, accountant, unit, sampling) for h, v in ledgers.items()
                                        if v.get("history")})
    levels = [f"{unit}-level {mechanism} at each hospital ('hospitals')"] if enabled else []
    if hospital_level is not None:
        card.update(dp=True, hospital_level=hospital_level_card(hospital_level))
        levels.append("hospital-level DP at the coordinator ('hospital_level')")
    card["level"] = " + ".join(levels) if levels else "none"
    return card
