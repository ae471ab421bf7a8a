"""Hospital silos: each hospital's images split by patient into members, held-out and validation.

- members:    trained on (plus optional duplicates, which drive memorisation);
- heldout:    never trained on; the membership attacks' non-members (same distribution as members);
- validation: never trained on, not in heldout; for utility (validation loss).

A patient never sits on two sides. `Silo.records()` lists every image's patient and content hash
per role, so the attacks can later rebuild exactly who was a member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedgen.config import DataConfig, ExperimentConfig
from fedgen.data.dataset import DataError, ImageSet
from fedgen.data.partition import partition

ROLES = ("member", "heldout", "validation", "canary")


@dataclass
class Silo:
    hospital: int
    members: ImageSet
    heldout: ImageSet
    validation: ImageSet
    train: ImageSet  # members (+ duplicates, + included canaries): what DP-SGD samples from
    duplicated: dict[str, int] = field(default_factory=dict)  # member hash -> extra copies
    canaries: ImageSet | None = None  # one-run audit: one image per canary patient
    canary_included: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def role(self, name: str) -> ImageSet:
        if name == "canary":
            return self.canaries if self.canaries is not None else self.heldout.subset([])
        return {"member": self.members, "heldout": self.heldout, "validation": self.validation}[name]

    def records(self) -> dict:
        """Who is where: patient ids and content hashes per role, and the duplicated members."""
        return {
            "hospital": self.hospital,
            "train_size": len(self.train),
            "roles": {
                role: [
                    {"patient": str(p), "hash": h}
                    for p, h in zip(self.role(role).patient_ids, self.role(role).content_hashes())
                ]
                for role in ROLES
            },
            "duplicated": self.duplicated,
            "canary_included": [bool(b) for b in self.canary_included],
        }


def split_by_patient(
    data: ImageSet, heldout_fraction: float, validation_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Image indices per role; whole patients are assigned, shuffled by `rng`."""
    patients = rng.permutation(np.unique(data.patient_ids))
    n = len(patients)
    n_held = int(round(heldout_fraction * n)) if heldout_fraction > 0 else 0
    n_val = int(round(validation_fraction * n)) if validation_fraction > 0 else 0
    n_held = max(n_held, 1) if heldout_fraction > 0 else 0
    n_val = max(n_val, 1) if validation_fraction > 0 else 0
    if n - n_held - n_val < 1:
        raise DataError(
            f"federation.num_hospitals: a silo of {n} patients cannot give {n_held} held-out and {n_val} "
            "validation patients and still keep one to train on (fewer hospitals, or more patients)"
        )
    groups = {
        "heldout": patients[:n_held],
        "validation": patients[n_held : n_held + n_val],
        "member": patients[n_held + n_val :],
    }
    return {role: np.flatnonzero(np.isin(data.patient_ids, ids)) for role, ids in groups.items()}


def duplicate(members: ImageSet, fraction: float, times: int, rng: np.random.Generator) -> tuple[ImageSet, dict[str, int]]:
    """Append `times` extra copies of a random `fraction` of the member images."""
    count = int(round(fraction * len(members)))
    if count == 0 or times == 0:
        return members, {}
    chosen = np.sort(rng.choice(len(members), size=count, replace=False))
    copies = members.subset(np.repeat(chosen, times))
    hashes = members.subset(chosen).content_hashes()
    return ImageSet.concat([members, copies]), {h: times for h in hashes}


def make_silo(hospital: int, data: ImageSet, cfg: ExperimentConfig) -> Silo:
    """Split one hospital's images and apply the configured duplication."""
    if len(data) == 0:
        raise DataError(f"hospital {hospital} has no images")
    rng = np.random.default_rng([cfg.seed, hospital, 202])
    roles = split_by_patient(data, cfg.data.heldout_fraction, cfg.data.validation_fraction, rng)
    members = data.subset(roles["member"])
    fed = cfg.federation
    dup_fraction = fed.duplicate_fraction if hospital in fed.duplicate_hospitals else 0.0
    train, duplicated = duplicate(members, dup_fraction, fed.duplicate_times, rng)
    heldout = data.subset(roles["heldout"])
    canaries, included = None, np.zeros(0, dtype=bool)
    if cfg.audit.canaries and hospital in cfg.audit.canary_hospitals:
        heldout, canaries = take_canaries(heldout, cfg.audit.canaries, hospital, rng)
        included = rng.random(len(canaries)) < 0.5
        train = ImageSet.concat([train, canaries.subset(np.flatnonzero(included))])
    return Silo(
        hospital=hospital,
        members=members,
        heldout=heldout,
        validation=data.subset(roles["validation"]),
        train=train,
        duplicated=duplicated,
        canaries=canaries,
        canary_included=included,
    )


def take_canaries(heldout: ImageSet, count: int, hospital: int, rng: np.random.Generator) -> tuple[ImageSet, ImageSet]:
    """Turn `count` held-out patients into canaries: one image each; their other images leave the
    held-out set (a patient's other image must not stand as a non-member of a trained canary)."""
    patients = rng.permutation(np.unique(heldout.patient_ids))
    if count >= len(patients):
        raise DataError(
            f"audit.canaries: hospital {hospital} has {len(patients)} held-out patients; "
            f"{count} canaries would leave none as non-members"
        )
    chosen = patients[:count]
    first = [int(np.flatnonzero(heldout.patient_ids == p)[0]) for p in chosen]
    rest = np.flatnonzero(~np.isin(heldout.patient_ids, chosen))
    return heldout.subset(rest), heldout.subset(first)


def load_pool(cfg: DataConfig, num_sources: int) -> ImageSet:
    """All images before partitioning: synthetic X-rays (one source per hospital) or a real loader."""
    if cfg.source == "synthetic":
        from fedgen.data.synthetic import generate_xrays

        return generate_xrays(
            num_patients=cfg.num_patients,
            images_per_patient=cfg.images_per_patient,
            image_size=cfg.image_size,
            num_sources=num_sources,
            finding_rate=cfg.finding_rate,
            seed=cfg.seed,
        )
    from fedgen.data.loaders import load_images

    if not cfg.path:
        raise DataError(f"data.path: the '{cfg.source}' loader needs a path")
    kwargs = {"csv_path": cfg.csv_path} if cfg.source == "folder" and cfg.csv_path else {}
    if cfg.source == "dicom":
        kwargs = {"unreadable": cfg.unreadable}
    return load_images(cfg.source, cfg.path, cfg.image_size, **kwargs)


def build_silos(cfg: ExperimentConfig) -> list[Silo]:
    """Every hospital's silo, deterministically from the config (each client rebuilds its own)."""
    pool = load_pool(cfg.data, num_sources=cfg.federation.num_hospitals)
    parts = partition(pool, cfg.federation, cfg.seed)
    return [make_silo(h, pool.subset(index), cfg) for h, index in enumerate(parts)]


def check_records(silo: Silo, path: Path) -> None:
    """Refuse a rebuilt silo whose members or held-out images differ from the hospital's
    records.json (as written at training time). No file: the hospital keeps its records elsewhere."""
    if not path.exists():
        return
    try:
        roles = json.loads(path.read_text())["roles"]
        recorded = {role: [r["hash"] for r in roles[role]] for role in ("member", "heldout")}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a hospital's records file ({err!r})") from err
    for role in ("member", "heldout"):
        if recorded[role] != silo.role(role).content_hashes():
            raise DataError(
                f"hospital {silo.hospital}: the rebuilt {role} images differ from {path}; "
                "the data or the code changed since training, so membership labels would be wrong"
            )


def save_records(silos: list[Silo], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"hospitals": [s.records() for s in silos]}, indent=1))


def load_records(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())["hospitals"]
