"""A hospital's own site in a real deployment: where its images are and where its records live.

A SuperNode runs at the hospital, next to its data, and says where that is in its node config
(`fedgen deploy supernode` writes it):

    partition-id    the hospital's index in the federation (0 .. num-partitions - 1)
    num-partitions  how many hospitals the federation has (must equal federation.num_hospitals)
    data-dir        the directory only this hospital writes to: per run, its epsilon ledger,
                    member/held-out records and last released update, in
                    <data-dir>/fedgen/<run name>/ (kept across SuperNode restarts; the coordinator
                    never sees or resets it)
    data-path       optional: the hospital's own images, read with the run's `data.source` loader
                    (folder, dicom, medmnist) and the usual `data.*` settings; the whole folder is
                    this hospital's silo. Without it (synthetic data), the hospital generates the
                    synthetic pool from the shared seed and takes its own partition.
    data-csv        optional, with data-path and data.source=folder: the CSV file,patient_id,label
    allow-reproducible-noise
                    true only on local test nodes (`fedgen deploy supernode --insecure`): without it
                    the hospital refuses a run with privacy.reproducible_noise, whose DP noise the
                    coordinator could regenerate from the config it sent
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import DataError

NODE_KEYS = ("partition-id", "num-partitions", "data-dir", "data-path", "data-csv", "allow-reproducible-noise",
             "lifetime-budget")


def site_budget(node_config: Mapping) -> float | None:
    """The site's own lifetime budget (`lifetime-budget` in the SuperNode's node config): the
    hospital applies the tighter of it and the run's privacy.lifetime_budget, so a coordinator
    cannot raise it. None: the site sets none."""
    raw = node_config.get("lifetime-budget")
    if raw in (None, ""):
        return None
    try:
        budget = float(raw)
    except (TypeError, ValueError):
        budget = float("nan")
    if not (budget > 0 and budget != float("inf")):
        raise ConfigError(f"node config lifetime-budget={raw!r}: must be a positive finite number")
    return budget


def site_home(data_dir: str | Path, run_name: str) -> Path:
    """Where the hospital keeps one run's ledger, records and last update."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ConfigError(f"name: '{run_name}' cannot name a directory at the hospital")
    return Path(data_dir).expanduser().resolve() / "fedgen" / run_name


def check_site_privacy(cfg: ExperimentConfig, node_config: Mapping) -> None:
    """The hospital protects itself: a coordinator cannot switch its DP noise to reproducible."""
    allowed = str(node_config.get("allow-reproducible-noise", "false")).lower() == "true"
    if cfg.privacy.enabled and cfg.privacy.reproducible_noise and not allowed:
        raise ConfigError(
            "privacy.reproducible_noise: the run asks this hospital to derive its DP noise and "
            "sampling from the config the coordinator sent (no guarantee). Refused: only a test "
            "SuperNode started with --insecure accepts it."
        )


def site_silo(cfg: ExperimentConfig, partition: int, node_config: Mapping):
    """The hospital's silo, from its own images (`data-path`) or its synthetic partition."""
    from fedgen.data.silos import make_silo
    from fedgen.federation.hospital import silos_for

    num_partitions = int(node_config.get("num-partitions", cfg.federation.num_hospitals))
    if num_partitions != cfg.federation.num_hospitals:
        raise ConfigError(
            f"federation.num_hospitals: the run says {cfg.federation.num_hospitals}, this SuperNode's "
            f"node config says num-partitions={num_partitions}"
        )
    if not 0 <= partition < num_partitions:
        raise ConfigError(f"partition-id {partition} is not in [0, {num_partitions})")
    path = node_config.get("data-path")
    if not path:
        if cfg.data.source != "synthetic":
            raise DataError(
                f"data.source is '{cfg.data.source}': this SuperNode needs data-path=<its images> "
                "in its node config"
            )
        return silos_for(cfg)[partition]
    if cfg.data.source == "synthetic":
        raise DataError("data-path is set but the run uses data=synthetic: pick data=folder|dicom|medmnist")
    from fedgen.data.loaders import load_images

    csv = node_config.get("data-csv")
    kwargs = {"csv_path": str(csv)} if csv and cfg.data.source == "folder" else {}
    if cfg.data.source == "dicom":
        kwargs = {"unreadable": cfg.data.unreadable}
    return make_silo(partition, load_images(cfg.data.source, str(path), cfg.data.image_size, **kwargs), cfg)
