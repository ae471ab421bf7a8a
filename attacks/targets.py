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

from fedgen.config import ExperimentConfig
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


def load_run_config(run_dir: RunDir) -> ExperimentConfig:
    return run_dir.experiment_config()


def candidates_from_run(run_dir: str | Path, seed: int = 0, per_hospital: int | None = None) -> tuple[Candidates, torch.Tensor]:
    """Balanced members/non-members of every hospital, and all training images (for extraction).

    per_hospital caps members (and as many non-members) per hospital; None takes as many as the
    smaller side allows. Raises if a hospital's records are missing or a rebuilt split disagrees
    with them: unchecked, the membership labels could be wrong without anyone knowing.
    """
    run = RunDir(run_dir)
    cfg = load_run_config(run)
    rng = np.random.default_rng(seed)
    images, member, hospital, patient, training = [], [], [], [], []
    for silo in build_silos(cfg):
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
    return (
        Candidates(torch.cat(images), np.concatenate(member), np.concatenate(hospital), np.concatenate(patient)),
        torch.cat(training),
    )
