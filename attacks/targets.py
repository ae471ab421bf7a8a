"""What an audit attacks: the released model, and the candidates rebuilt from the run's own records.

Members are each hospital's trained images; non-members its held-out images (same distribution,
split by patient, never trained on). The auditor rebuilds both from the run's config and checks
them, image by image, against the content hashes each hospital recorded, so the labels are
exactly who was a member. The attacks themselves only ever see the weights and the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attacks.reference_models import population_images
from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import DataError
from fedgen.data.silos import build_silos, check_records
from fedgen.run_dir import RunDir


@dataclass
class Candidates:
    """images [N,1,H,W] in [-1,1]; is_member [N] bool; hospital [N] int; patient [N] str."""

    images: torch.Tensor
    is_member: np.ndarray
    hospital: np.ndarray
    patient: np.ndarray

    def concat(self, other: Candidates) -> Candidates:
        return Candidates(torch.cat([self.images, other.images]), np.r_[self.is_member, other.is_member],
                          np.r_[self.hospital, other.hospital], np.r_[self.patient, other.patient])


def load_run_config(run_dir: RunDir) -> ExperimentConfig:
    return run_dir.experiment_config()


def candidates_from_run(run_dir: str | Path, seed: int = 0, per_hospital: int | None = None,
                        fresh: int = 0) -> tuple[Candidates, torch.Tensor]:
    """Balanced members/non-members of every hospital, and all training images (for extraction).

    per_hospital caps members (and as many non-members) per hospital; None takes as many as the
    smaller side allows. Raises if a hospital's records are missing or a rebuilt split disagrees
    with them: unchecked, the membership labels could be wrong without anyone knowing.
    fresh: that many more non-members, new synthetic patients of the hospitals' scanners
    (`fresh_nonmembers`).
    """
    run = RunDir(run_dir)
    cfg = load_run_config(run)
    rng = np.random.default_rng(seed)
    images, member, hospital, patient, training = [], [], [], [], []
    silos = build_silos(cfg)
    for silo in silos:
        records = run.hospital_home(silo.hospital) / "records.json"
        if not records.exists():
            raise DataError(
                f"{records}: missing; the audit checks every candidate against the records the hospital "
                "wrote at training time (a deployed hospital keeps them at <data-dir>/fedgen/<name>/: copy them here)"
            )
        check_records(silo, records)
        n = min(len(silo.members), len(silo.heldout))
        if per_hospital:
            n = min(n, per_hospital)
        for role, chosen in ((True, silo.members), (False, silo.heldout)):
            pick = np.sort(rng.choice(len(chosen), size=n, replace=False))
            images.append(chosen.images[torch.from_numpy(pick)])
            member.append(np.full(n, role))
            hospital.append(np.full(n, silo.hospital))
            patient.append(chosen.patient_ids[pick])
        training.append(silo.members.images)
    found = Candidates(torch.cat(images), np.concatenate(member), np.concatenate(hospital), np.concatenate(patient))
    if fresh:
        found = found.concat(fresh_nonmembers(cfg, silos, fresh))
    return found, torch.cat(training)


def fresh_nonmembers(cfg: ExperimentConfig, silos: list, count: int) -> Candidates:
    """`count` more non-members for a synthetic federation: new patients of the hospitals' scanners,
    each the non-member of the hospital whose scanner imaged it.

    A silo's held-out patients are few (tens at the leak preset), and TPR at 1% FPR needs ~1000
    non-members to mean something (`attacks.metrics`); the generator draws any number more from the
    same distribution, never a member, a held-out patient or a reference population's."""
    if cfg.data.source != "synthetic":
        raise ConfigError(f"fresh non-members: only a synthetic federation can draw new patients (data.source="
                          f"{cfg.data.source!r}); a real hospital holds out more of its own patients instead")
    hospital_of = {}
    for silo in silos:
        scanners = set(silo.members.sources) | set(silo.heldout.sources)
        if len(scanners) != 1:
            raise ConfigError(f"fresh non-members: hospital {silo.hospital} holds images of {len(scanners)} scanners, "
                              "so a new patient has no hospital of its own; use federation.partitioning=source")
        hospital_of[scanners.pop()] = silo.hospital
    drawn = population_images(cfg, count, "hospitals", fresh=True)
    return Candidates(drawn.images, np.zeros(count, dtype=bool),
                      np.array([hospital_of[s] for s in drawn.sources]), drawn.patient_ids)
