"""The public archive a base model is pretrained on: images of patients no hospital holds.

Hospitals have exactly this setting: public chest X-ray archives exist (multi-site, many
scanners), their own patients are the private part. The synthetic archive stands in for one: its
patients and its acquisition sources are its own (sources numbered from `PUBLIC_SOURCES`, which no
hospital uses, so no patient id, anatomy stream or scanner profile is shared with a silo), drawn
from several scanners, so a base model learns anatomy in a range of styles and each hospital has
its own style to adapt to. A real archive is read with the usual loaders (`pretrain.source`).
"""

from __future__ import annotations

from fedgen.config import PretrainConfig
from fedgen.data.dataset import DataError, ImageSet

PUBLIC_SOURCES = 1000  # synthetic sources of the archive start here; hospitals use 0, 1, 2, ...


def public_archive(cfg: PretrainConfig, image_size: int, seed: int) -> ImageSet:
    """The archive's images [N, 1, S, S] in [-1, 1]."""
    if cfg.source == "synthetic":
        from fedgen.data.synthetic import generate_xrays

        return generate_xrays(
            num_patients=cfg.num_patients,
            images_per_patient=cfg.images_per_patient,
            image_size=image_size,
            num_sources=cfg.num_sources,
            finding_rate=cfg.finding_rate,
            seed=seed,
            first_source=PUBLIC_SOURCES,
        )
    if not cfg.path:
        raise DataError(f"pretrain.path: the '{cfg.source}' loader needs the public archive's path")
    from fedgen.data.loaders import load_images

    kwargs = {"csv_path": cfg.csv_path} if cfg.source == "folder" and cfg.csv_path else {}
    return load_images(cfg.source, cfg.path, image_size, **kwargs)
