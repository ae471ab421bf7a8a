"""Partitioning and per-hospital splits: patients never cross sides, records rebuild membership."""

import dataclasses

import numpy as np
import pytest
import torch

from fedgen.config import ConfigError, FederationConfig
from fedgen.data.dataset import DataError, ImageSet
from fedgen.data.partition import partition
from fedgen.data.silos import build_silos, split_by_patient


def _pool(patients=60, per_patient=3, sources=3, seed=0):
    rng = np.random.default_rng(seed)
    n = patients * per_patient
    pid = np.repeat([f"p{i:03d}" for i in range(patients)], per_patient)
    labels = np.repeat(rng.integers(0, 2, patients), per_patient)
    src = np.repeat([f"src{i % sources}" for i in range(patients)], per_patient)
    images = torch.from_numpy(rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32))
    return ImageSet(images, pid, labels, src)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "source"])
def test_partitions_cover_every_image_once_and_keep_patients_whole(scheme):
    data = _pool()
    parts = partition(data, FederationConfig(num_hospitals=3, partitioning=scheme, dirichlet_alpha=1.0), seed=0)
    assert len(parts) == 3
    allocated = np.concatenate(parts)
    assert sorted(allocated.tolist()) == list(range(len(data)))
    owners = {}
    for h, index in enumerate(parts):
        for p in set(data.patient_ids[index]):
            assert owners.setdefault(p, h) == h, f"patient {p} in two hospitals"


def test_source_partition_gives_one_source_per_hospital():
    data = _pool()
    parts = partition(data, FederationConfig(num_hospitals=3, partitioning="source"), seed=0)
    assert [set(data.sources[i]) for i in parts] == [{"src0"}, {"src1"}, {"src2"}]
    with pytest.raises(ConfigError, match="partitioning"):
        partition(data, FederationConfig(num_hospitals=4, partitioning="source"), seed=0)


def test_dirichlet_skews_labels_and_quantity_skews_sizes():
    data = _pool(patients=300)
    fed = FederationConfig(num_hospitals=4, partitioning="dirichlet", dirichlet_alpha=0.1)
    rates = [data.labels[i].mean() for i in partition(data, fed, seed=1)]
    assert max(rates) - min(rates) > 0.3
    fed = FederationConfig(num_hospitals=4, partitioning="quantity", quantity_sigma=1.5)
    sizes = [len(i) for i in partition(data, fed, seed=1)]
    assert max(sizes) > 2 * min(sizes)


def test_empty_hospital_is_a_clear_error():
    data = _pool(patients=2)
    with pytest.raises(DataError, match="hospital 2 received no patients"):
        partition(data, FederationConfig(num_hospitals=3, partitioning="iid"), seed=0)


def test_split_by_patient_never_shares_a_patient():
    data = _pool(patients=40)
    roles = split_by_patient(data, 0.25, 0.1, np.random.default_rng(0))
    patients = {role: set(data.patient_ids[i]) for role, i in roles.items()}
    assert not patients["member"] & patients["heldout"]
    assert not patients["member"] & patients["validation"]
    assert not patients["heldout"] & patients["validation"]
    assert sum(len(i) for i in roles.values()) == len(data)
    assert len(patients["heldout"]) == 10 and len(patients["validation"]) == 4


def test_silos_are_deterministic_and_records_rebuild_membership(base_config):
    cfg = dataclasses.replace(base_config, data=dataclasses.replace(base_config.data, num_patients=90, image_size=16))
    silos, again = build_silos(cfg), build_silos(cfg)
    assert len(silos) == cfg.federation.num_hospitals
    for silo, twin in zip(silos, again):
        assert torch.equal(silo.train.images, twin.train.images)
        records = silo.records()
        member_hashes = {r["hash"] for r in records["roles"]["member"]}
        heldout_hashes = {r["hash"] for r in records["roles"]["heldout"]}
        assert member_hashes == set(silo.members.content_hashes())
        assert not member_hashes & heldout_hashes
        assert set(silo.train.content_hashes()) == member_hashes  # nothing held out is trained on
        member_patients = {r["patient"] for r in records["roles"]["member"]}
        assert not member_patients & {r["patient"] for r in records["roles"]["heldout"]}


def test_duplication_appends_copies_of_chosen_members(base_config):
    fed = dataclasses.replace(base_config.federation, duplicate_fraction=0.2, duplicate_times=3, duplicate_hospitals=[1])
    cfg = dataclasses.replace(
        base_config, federation=fed, data=dataclasses.replace(base_config.data, num_patients=90, image_size=16)
    )
    silos = build_silos(cfg)
    assert not silos[0].duplicated and len(silos[0].train) == len(silos[0].members)
    silo = silos[1]
    expected = round(0.2 * len(silo.members))
    assert len(silo.duplicated) == expected
    assert len(silo.train) == len(silo.members) + 3 * expected
    hashes = silo.train.content_hashes()
    assert all(hashes.count(h) == 4 for h in silo.duplicated)


def test_canaries_come_from_whole_heldout_patients_and_half_are_trained(base_config):
    import dataclasses as dc

    from fedgen.config import AuditConfig

    cfg = dc.replace(
        base_config,
        data=dc.replace(base_config.data, num_patients=240, image_size=16),
        audit=AuditConfig(canaries=12, canary_hospitals=[0]),
    )
    silo = build_silos(cfg)[0]
    assert len(silo.canaries) == 12 and len(set(silo.canaries.patient_ids)) == 12
    assert not set(silo.canaries.patient_ids) & set(silo.heldout.patient_ids)
    assert not set(silo.canaries.patient_ids) & set(silo.members.patient_ids)
    train = set(silo.train.content_hashes())
    hashes = silo.canaries.content_hashes()
    assert [h in train for h in hashes] == list(silo.canary_included)
    assert 1 <= silo.canary_included.sum() <= 11
    assert silo.records()["canary_included"] == [bool(b) for b in silo.canary_included]
    assert build_silos(cfg)[1].canaries is None
