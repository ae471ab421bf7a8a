"""Partitioning a pooled data set into hospitals, patient by patient (a patient stays in one hospital)."""

from __future__ import annotations

import numpy as np

from fedgen.config import ConfigError, FederationConfig
from fedgen.data.dataset import DataError, ImageSet


def _patients(data: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """Unique patient ids (in first-seen order) and, for each image, its patient's index."""
    unique, first, inverse = np.unique(data.patient_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return unique[order], rank[inverse]


def _split_evenly(items: np.ndarray, parts: int) -> list[np.ndarray]:
    return [np.asarray(chunk) for chunk in np.array_split(items, parts)]


def _iid(patient_labels: np.ndarray, cfg: FederationConfig, rng: np.random.Generator, _s) -> list[np.ndarray]:
    return _split_evenly(rng.permutation(len(patient_labels)), cfg.num_hospitals)


def _dirichlet(patient_labels: np.ndarray, cfg: FederationConfig, rng: np.random.Generator, _s) -> list[np.ndarray]:
    """Label skew: each class's patients spread over hospitals by proportions ~ Dir(alpha)."""
    parts: list[list[int]] = [[] for _ in range(cfg.num_hospitals)]
    for label in np.unique(patient_labels):
        members = rng.permutation(np.flatnonzero(patient_labels == label))
        shares = rng.dirichlet(np.full(cfg.num_hospitals, cfg.dirichlet_alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for h, chunk in enumerate(np.split(members, cuts)):
            parts[h].extend(chunk.tolist())
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


def _quantity(patient_labels: np.ndarray, cfg: FederationConfig, rng: np.random.Generator, _s) -> list[np.ndarray]:
    """Quantity skew: silo sizes proportional to log-normal(0, sigma) draws."""
    n = len(patient_labels)
    shares = rng.lognormal(0.0, cfg.quantity_sigma, cfg.num_hospitals)
    cuts = (np.cumsum(shares / shares.sum())[:-1] * n).astype(int)
    return [np.asarray(c) for c in np.split(rng.permutation(n), cuts)]


def _by_source(patient_labels: np.ndarray, cfg: FederationConfig, rng: np.random.Generator, patient_sources) -> list[np.ndarray]:
    """One acquisition source per hospital (sources beyond num_hospitals are dealt round robin)."""
    sources = sorted(set(patient_sources.tolist()))
    if len(sources) < cfg.num_hospitals:
        raise ConfigError(
            f"federation.partitioning: 'source' needs at least num_hospitals={cfg.num_hospitals} "
            f"sources, the data has {len(sources)} ({', '.join(sources[:5])}{', ...' if len(sources) > 5 else ''})"
        )
    parts: list[list[int]] = [[] for _ in range(cfg.num_hospitals)]
    for i, source in enumerate(sources):
        parts[i % cfg.num_hospitals].extend(np.flatnonzero(patient_sources == source).tolist())
    return [np.asarray(p, dtype=np.int64) for p in parts]


PARTITIONERS = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity, "source": _by_source}


def partition(data: ImageSet, cfg: FederationConfig, seed: int) -> list[np.ndarray]:
    """Image indices of each hospital. Patients are the unit: all of a patient's images go together.

    A patient's label is the max of its images' labels (a finding on any image); its source is its
    first image's source. Raises DataError if a hospital ends up with no patients.
    """
    patients, image_patient = _patients(data)
    first_image = np.array([np.flatnonzero(image_patient == p)[0] for p in range(len(patients))])
    patient_labels = np.array([data.labels[image_patient == p].max() for p in range(len(patients))])
    patient_sources = data.sources[first_image]
    rng = np.random.default_rng([seed, 101])
    hospital_patients = PARTITIONERS[cfg.partitioning](patient_labels, cfg, rng, patient_sources)
    silos = []
    for h, chosen in enumerate(hospital_patients):
        if len(chosen) == 0:
            raise DataError(
                f"hospital {h} received no patients under partitioning '{cfg.partitioning}' "
                f"({len(patients)} patients for {cfg.num_hospitals} hospitals); use more data, "
                "fewer hospitals or a larger dirichlet_alpha"
            )
        silos.append(np.flatnonzero(np.isin(image_patient, chosen)))
    return silos
