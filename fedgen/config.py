"""Typed configuration: composition of Hydra's `conf/`, and checks of impossible settings.

The schema (one dataclass per section) is `fedgen.schema`, re-exported here.

`conf/` is the single source of truth. Entry points compose it once (`compose`), turn it into these
dataclasses (`to_config`) and hand the dataclasses to library code, which never sees a DictConfig.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedgen.hospital_level_schema import HospitalLevelConfig, hospital_level_problems  # noqa: F401  (re-exported)
from fedgen.schema import (  # noqa: F401  (re-exported: the schema is part of this module's interface)
    AuditConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    PretrainConfig,
    PrivacyConfig,
    TrainingConfig,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATA_SOURCES = ("synthetic", "medmnist", "folder", "dicom")
LR_SCHEDULES = ("constant", "cosine")
SYNTHETIC_MIN_SIZE = 16  # smaller, the synthetic X-rays' anatomy and nodules are a few blurred pixels


def register_schemas() -> None:
    """Register the schema so every composed config is type-checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/` with Hydra overrides (e.g. ["privacy=eps1", "federation.num_rounds=3"])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if config_name == "config":
        check_override_keys(overrides, ExperimentConfig(), groups=[p.name for p in CONF_DIR.iterdir() if p.is_dir()])
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # Hydra's messages run to a dozen lines: one line, naming the override
        if not type(err).__module__.startswith(("hydra", "omegaconf")):
            raise
        raise ConfigError(_one_line(err, overrides)) from err


def _one_line(err: Exception, overrides: list[str]) -> str:
    missing = re.search(r"Could not find '(\w+)/([^']*)'", str(err))
    if missing:
        group, option = missing.groups()
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        return f"{group}={option}: no such option; known: {', '.join(known)}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See ")]
    message = ": ".join(lines[:2])  # what failed, and why
    if err.__cause__ is not None:
        message += ": " + str(err.__cause__).splitlines()[0]
    if not any(o.lstrip("~+").split("=")[0] in message for o in overrides):
        message = f"overrides {' '.join(overrides)}: {message}"
    return message


def check_override_keys(overrides: list[str], schema, groups=(), prefix: str = "") -> None:
    """Refuse an override whose key no schema knows. Hydra would say to add it with `+`, and a
    `+key` is then composed and silently dropped: `+federation.num_round=3` trains the default."""
    known: dict[str, bool] = {}  # setting -> is it a section (a dataclass)?
    sections = [(schema, prefix)]
    for node, path in sections:
        for f in fields(node):
            value = getattr(node, f.name)
            known[path + f.name] = is_dataclass(value)
            if is_dataclass(value):
                sections.append((value, path + f.name + "."))  # this same loop visits it
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        parents = [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]
        # lists and dicts (model.block_out_channels.0, sweep.settings.<name>) take any sub-key
        if key in known or key in groups or any(known.get(p) is False for p in parents):
            continue
        close = difflib.get_close_matches(key, [*known, *groups], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}: no such setting{hint}; see conf/ for every setting")


def to_config(cfg: DictConfig) -> ExperimentConfig:
    """Turn a composed DictConfig into the typed dataclass tree and check it."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
    config = OmegaConf.to_object(merged)
    assert isinstance(config, ExperimentConfig)
    validate(config)
    return config


def absolute_init(overrides: list[str]) -> list[str]:
    """`model.init=<folder>` as an absolute path: Flower's processes may not share our cwd."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "model.init" and value not in ("", "null", "pretrained"):
            o = f"{key}={Path(value).expanduser().resolve()}"
        out.append(o)
    return out


def load_config(overrides: list[str] | None = None) -> ExperimentConfig:
    overrides = list(overrides or [])
    cfg = to_config(compose(overrides))
    check_privacy_preset(overrides, cfg.privacy)
    return cfg


def check_privacy_preset(overrides: list[str], privacy: PrivacyConfig) -> None:
    """`privacy=<preset>` must mean what it says. A preset composed after the privacy group (e.g.
    experiment=leak turns DP off) would otherwise undo it silently: a run named eps1 without DP.
    Explicit `privacy.<key>=` overrides are the user's own word and are left alone."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("privacy=")]
    if not chosen or any(o.lstrip("~+").startswith("privacy.") for o in overrides):
        return
    preset = to_config(compose([f"privacy={chosen[-1]}"])).privacy

    def promise(p: PrivacyConfig) -> tuple:
        return (p.enabled, p.target_epsilon if p.enabled else None)

    if promise(privacy) != promise(preset):
        others = " ".join(o for o in overrides if not o.lstrip("+").startswith("privacy="))
        raise ConfigError(
            f"privacy={chosen[-1]}: the run does not train with privacy={chosen[-1]}: another override "
            f"({others}) changes the privacy settings after it (a preset that sets privacy itself, like "
            "experiment=leak or leak_dp, has a twin that leaves it to you: experiment=leak_data)"
        )


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}: {message}")


def validate(cfg: ExperimentConfig) -> None:
    """Fail before any training on settings that cannot work. Silo-dependent checks (delta < 1/N,
    empty silos) happen where the silo is known: `privacy.check_delta`, `partition.partition`."""
    d, m, p, t, f = cfg.data, cfg.model, cfg.privacy, cfg.training, cfg.federation
    _require(d.unreadable in ("skip", "error"), "data.unreadable", f"must be skip or error, got {d.unreadable!r}")
    _require(d.source in DATA_SOURCES, "data.source", f"unknown '{d.source}'; known: {', '.join(DATA_SOURCES)}")
    downsamples = len(m.block_out_channels) - 1
    _require(d.image_size >= 2**downsamples, "data.image_size", f"must be >= {2**downsamples} (the UNet's "
             f"{downsamples + 1} resolution levels halve it {downsamples} times), got {d.image_size}")
    if d.source == "synthetic" or (m.init == "pretrained" and cfg.pretrain.source == "synthetic"):
        which = "data.source" if d.source == "synthetic" else "pretrain.source, for model.init=pretrained"
        _require(d.image_size >= SYNTHETIC_MIN_SIZE, "data.image_size",
                 f"synthetic X-rays ({which}) need >= {SYNTHETIC_MIN_SIZE}, got {d.image_size}")
    _require(d.image_size % (2**downsamples) == 0, "data.image_size", f"{d.image_size} is not divisible by "
             f"2^{downsamples}, which the UNet's {len(m.block_out_channels)} resolution levels need")
    _require(len(m.down_block_types) == len(m.block_out_channels) == len(m.up_block_types), "model.block_out_channels",
             "down_block_types, up_block_types and block_out_channels must have the same length")
    for c in m.block_out_channels:
        _require(c % m.norm_num_groups == 0, "model.norm_num_groups", f"{m.norm_num_groups} does not divide block width {c}")
    for name, frac in (("heldout_fraction", d.heldout_fraction), ("validation_fraction", d.validation_fraction)):
        _require(0.0 <= frac < 1.0, f"data.{name}", f"must be in [0, 1), got {frac}")
    _require(d.heldout_fraction + d.validation_fraction < 1.0, "data.heldout_fraction",
             "held-out plus validation fractions leave no patients to train on")
    if p.enabled:
        _require(p.target_epsilon > 0 and math.isfinite(p.target_epsilon), "privacy.target_epsilon",
                 f"must be a positive finite number, got {p.target_epsilon}")
        _require(0.0 < p.delta < 1.0, "privacy.delta", f"must be in (0, 1), got {p.delta}")
        _require(p.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {p.max_grad_norm}")
        _require(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier",
                 f"must be > 0 (or null to calibrate), got {p.noise_multiplier}")
        _require(p.accountant in ("rdp", "prv"), "privacy.accountant", f"unknown '{p.accountant}'")
        _require(p.unit in ("example", "patient"), "privacy.unit", f"unknown '{p.unit}'; known: example, patient")
    _require(p.lifetime_budget is None or (p.lifetime_budget > 0 and math.isfinite(p.lifetime_budget)),
             "privacy.lifetime_budget", f"must be a positive finite number or null, got {p.lifetime_budget}")
    _require(t.batch_size >= 1, "training.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
    _require(t.noise_multiplicity >= 1, "training.noise_multiplicity", "must be >= 1")
    _require(t.optimizer in ("adam", "sgd"), "training.optimizer", f"unknown '{t.optimizer}'")
    _require(t.lr_schedule in LR_SCHEDULES, "training.lr_schedule",
             f"must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    _require(0.0 <= t.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _require(t.max_physical_batch_size >= 0, "training.max_physical_batch_size",
             f"must be >= 0 (0: no limit), got {t.max_physical_batch_size}")
    r = t.timestep_range
    _require(r is None or (len(r) == 2 and 0 <= r[0] < r[1] <= m.num_train_timesteps), "training.timestep_range",
             f"must be [low, high] with 0 <= low < high <= model.num_train_timesteps ({m.num_train_timesteps}), got {r}")
    _require(t.gradient_subspace >= 0, "training.gradient_subspace", f"must be >= 0 (0: off), got {t.gradient_subspace}")
    _require(t.gradient_subspace <= t.subspace_images, "training.gradient_subspace",
             f"{t.gradient_subspace} directions need at least as many public images (training.subspace_images={t.subspace_images})")
    pre = cfg.pretrain
    for name in ("num_patients", "images_per_patient", "num_sources", "epochs", "batch_size"):
        _require(getattr(pre, name) >= 1, f"pretrain.{name}", f"must be >= 1, got {getattr(pre, name)}")
    _require(pre.learning_rate > 0, "pretrain.learning_rate", f"must be > 0, got {pre.learning_rate}")
    _require(pre.source in DATA_SOURCES, "pretrain.source", f"unknown '{pre.source}'; known: {', '.join(DATA_SOURCES)}")
    _require(f.num_hospitals >= 1, "federation.num_hospitals", f"must be >= 1, got {f.num_hospitals}")
    _require(d.source != "synthetic" or f.num_hospitals <= d.num_patients, "federation.num_hospitals",
             f"{f.num_hospitals} hospitals but data.num_patients={d.num_patients}: each needs patients of its own")
    _require(f.num_rounds >= 1, "federation.num_rounds", f"must be >= 1, got {f.num_rounds}")
    _require(f.local_epochs >= 1, "federation.local_epochs", f"must be >= 1, got {f.local_epochs}")
    _require(0.0 < f.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
    _require(
        0 <= f.min_train_nodes <= f.num_hospitals,
        "federation.min_train_nodes",
        f"must be in [0, num_hospitals={f.num_hospitals}] (0: every sampled hospital), got {f.min_train_nodes}",
    )
    _require(f.strategy in ("fedavg", "fedprox", "fedadam"), "federation.strategy", f"unknown '{f.strategy}'")
    _require(f.sampling_method in ("ddpm", "ddim"), "federation.sampling_method",
             f"must be 'ddpm' or 'ddim', got '{f.sampling_method}'")
    _require(f.sampling_steps >= 1, "federation.sampling_steps", f"must be >= 1, got {f.sampling_steps}")
    _require(f.partitioning in ("iid", "dirichlet", "quantity", "source"), "federation.partitioning",
             f"unknown '{f.partitioning}'")
    _require(0.0 <= f.duplicate_fraction <= 1.0, "federation.duplicate_fraction", "must be in [0, 1]")
    _require(f.duplicate_times >= 0, "federation.duplicate_times", "must be >= 0")
    _require(
        0 <= f.min_available_nodes <= f.num_hospitals,
        "federation.min_available_nodes",
        f"must be in [0, num_hospitals={f.num_hospitals}], got {f.min_available_nodes}",
    )
    _require(f.parallel_clients >= 0, "federation.parallel_clients", f"must be >= 0, got {f.parallel_clients}")
    _require(f.client_cpus >= 1, "federation.client_cpus", f"must be >= 1, got {f.client_cpus}")
    _require(f.round_timeout > 0, "federation.round_timeout", f"must be > 0 seconds, got {f.round_timeout}")
    if f.secure_aggregation:  # SecAgg+ needs two hospitals a round; its integer sums bound their number
        _require(max(int(f.num_hospitals * f.fraction_train), f.min_train_nodes) >= 2 and f.num_hospitals <= 63, "federation.secure_aggregation",
                 f"needs 2 to 63 hospitals sampled per round, got {f.num_hospitals} x fraction_train {f.fraction_train:g}")
        _require(f.secagg_clipping_range > 0, "federation.secagg_clipping_range", "must be > 0")
        _require(f.secagg_max_weight >= 1, "federation.secagg_max_weight", "must be >= 1")
    for setting, problem in hospital_level_problems(p.hospital_level, f.num_hospitals, f.strategy, f.fraction_train,
                                                    f.secure_aggregation, p.accountant):
        raise ConfigError(f"{setting}: {problem}")
    _require(cfg.audit.canaries >= 0, "audit.canaries", f"must be >= 0, got {cfg.audit.canaries}")
    sel = cfg.selection
    _require(sel.pool_size >= 2, "selection.pool_size", f"must be >= 2, got {sel.pool_size}")
    _require(sel.cells == 0 or 2 <= sel.cells <= sel.pool_size, "selection.cells",
             f"must be 0 (from the budget) or in [2, selection.pool_size={sel.pool_size}], got {sel.cells}")
    _require(sel.num_samples >= 1, "selection.num_samples", f"must be >= 1, got {sel.num_samples}")
    _require(sel.eval_samples > 3, "selection.eval_samples", f"must be > 3 (precision's k), got {sel.eval_samples}")


def overrides_from_run_config(run_config) -> list[str]:
    """The Hydra overrides a Flower app received (`overrides`: a JSON list in the run config)."""
    import json

    raw = str(run_config.get("overrides", "") or "[]")
    overrides = json.loads(raw)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"run config 'overrides' must be a JSON list of strings, got {raw[:200]}")
    return overrides
