"""Typed configuration: the schemas behind Hydra's `conf/`, composition, and checks of impossible settings.

`conf/` is the single source of truth. Entry points compose it once (`compose`), turn it into these
dataclasses (`to_config`) and hand the dataclasses to library code, which never sees a DictConfig.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedgen.hospital_level_schema import HospitalLevelConfig, hospital_level_problems

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATA_SOURCES = ("synthetic", "medmnist", "folder", "dicom")
SYNTHETIC_MIN_SIZE = 16  # smaller, the synthetic X-rays' anatomy and nodules are a few blurred pixels


class ConfigError(ValueError):
    """A setting that cannot work. The message names the setting (e.g. `privacy.delta`)."""


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | medmnist | folder | dicom
    path: str | None = None  # file or folder for the real loaders
    csv_path: str | None = None  # folder loader: optional CSV with file,patient_id,label
    # dicom loader: files that are no grey image (colour, reports, corrupt): "skip" counts them
    # by cause in one line; "error" stops at the first
    unreadable: str = "skip"
    image_size: int = 32
    num_patients: int = 600  # synthetic: patients over all hospitals
    images_per_patient: int = 2  # synthetic
    finding_rate: float = 0.3  # synthetic: share of patients with a nodule (label 1)
    heldout_fraction: float = 0.25  # share of each hospital's patients held out for the attacks
    validation_fraction: float = 0.1  # share of each hospital's patients for utility evaluation
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "DownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "UpBlock2D", "UpBlock2D"]
    )
    layers_per_block: int = 1
    mid_block_attention: bool = True
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # any diffusers DDPMScheduler beta_schedule
    # Where round 0's global model comes from: null = random weights from `seed`; "pretrained" =
    # fedgen's base, trained without DP on the public archive (`pretrain.*`) and cached under
    # <runs_dir>/pretrained/; or the path of any diffusers DDPMPipeline or UNet2DModel folder.
    init: str | None = None


@dataclass
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 8.0  # the budget for the hospital's whole planned training
    delta: float = 1e-5  # must be below 1 / (training images in the silo)
    max_grad_norm: float = 1.0  # per-example clipping bound C
    noise_multiplier: float | None = None  # set to skip calibration; must still fit the budget
    accountant: str = "rdp"  # rdp | prv (Opacus accountants; gdp is an approximation, not a bound)
    # What one DP "example" is: an image, or a patient (all its images sampled, clipped and noised
    # as one: Poisson sampling of patients with q = batch_size / patients).
    unit: str = "example"  # example | patient
    # True derives the DP noise and Poisson sampling from the seed, which every party can read:
    # NO guarantee (tests, debugging). False (default): secret, from the OS's CSPRNG.
    reproducible_noise: bool = False
    # The most epsilon the hospital may spend on its patients over all its runs (its site's
    # lifetime ledger, `fedgen.privacy.lifetime`): a run whose whole plan would pass it is refused
    # before it trains. null: no limit (every run is still recorded).
    lifetime_budget: float | None = None
    hospital_level: HospitalLevelConfig = field(default_factory=HospitalLevelConfig)  # the coordinator's DP, off by default


@dataclass
class TrainingConfig:
    batch_size: int = 32  # expected (logical) batch size: Poisson sample rate q = batch_size / N
    learning_rate: float = 2e-3
    optimizer: str = "adam"  # adam | sgd
    noise_multiplicity: int = 1  # K draws of (t, noise) averaged per example before clipping
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Which parameters the hospitals train (the rest stay as the global model has them, and DP
    # computes and noises no gradient for them): "all", or named groups joined by "+":
    # norms_biases, attention, up_blocks, down_blocks, mid_block, head (fedgen.trainable.TRAINABLE_GROUPS),
    # and lora: low-rank adapters (peft) on the layers `lora_targets` names, merged before sending.
    trainable: str = "all"
    lora_rank: int = 8
    lora_alpha: float = 8.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"])
    # > 0: each hospital sends the exponential moving average of its local iterates (decay per
    # step) instead of the last one: post-processing of the noisy steps, free in privacy.
    ema_decay: float = 0.0
    # > 0: per-example gradients are computed in chunks of at most this many images and summed
    # before the one noisy step (Opacus-style virtual steps): logical batches larger than memory.
    max_physical_batch_size: int = 0


@dataclass
class PretrainConfig:
    """The public archive the base model (model.init=pretrained) trains on, without DP."""

    source: str = "synthetic"  # synthetic | medmnist | folder | dicom
    path: str | None = None  # a real archive for the loaders
    csv_path: str | None = None
    num_patients: int = 1600  # synthetic: patients in the archive (none shared with a hospital)
    images_per_patient: int = 1
    num_sources: int = 8  # synthetic: scanners in the archive, each with its own style
    finding_rate: float = 0.3
    seed: int = 0
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3


@dataclass
class FederationConfig:
    num_hospitals: int = 3
    num_rounds: int = 5
    fraction_train: float = 1.0  # share of hospitals sampled per round
    min_train_nodes: int = 0  # usable updates a round needs (0: every sampled hospital); fewer leave the model unchanged
    min_available_nodes: int = 0  # wait for this many connected hospitals before each round (0: min_train_nodes, or all)
    local_epochs: int = 4
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam
    proximal_mu: float = 0.01  # fedprox
    server_learning_rate: float = 0.01  # fedadam
    partitioning: str = "source"  # iid | dirichlet | quantity | source
    dirichlet_alpha: float = 0.5
    quantity_sigma: float = 1.0  # log-normal spread of silo sizes
    duplicate_fraction: float = 0.0  # share of a hospital's training images duplicated
    duplicate_times: int = 1  # each duplicated image appears this many extra times
    duplicate_hospitals: list[int] = field(default_factory=lambda: [0])
    max_update_norm: float = 1000.0  # reject updates farther than this from the global model
    # SecAgg+: the coordinator sees only the sum of the updates (fedgen/federation/secure_aggregation.py)
    secure_aggregation: bool = False
    secagg_clipping_range: float = 1.0  # a hospital refuses an update with |coordinate x its weight share| above it
    secagg_max_weight: float = 10000.0  # the largest num-examples (training images) a hospital may weigh in with
    record_updates: bool = False  # the curious coordinator keeps what it receives (<run>/updates/) for `fedgen invert`
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    sample_every: int = 1  # rounds between fixed-noise sample grids in TensorBoard
    num_samples: int = 16
    sampling_steps: int = 25  # denoising steps for the grids and the utility samples
    # "ddpm" (ancestral: fresh noise at each step) or "ddim" (deterministic). DDPM forgives the
    # noise-prediction errors DP training leaves: a DP model whose DDIM samples are noise draws
    # recognisable X-rays with DDPM at the same number of steps.
    sampling_method: str = "ddpm"
    client_cpus: int = 1  # simulation: CPU cores reserved per simulated hospital
    # simulation on one machine: hospitals that train at once (0: all of them, at most 8). Ray is
    # told there are this many x client_cpus CPUs, so 3 hospitals on 2 cores train side by side
    # instead of in two waves (the second leaving a core idle).
    parallel_clients: int = 0
    client_gpus: float = -1.0  # simulation: GPUs per simulated hospital; -1 = 1 if CUDA is present


@dataclass
class AuditConfig:
    # One-run audit (Steinke, Nasr & Jagielski 2023): per hospital, `canaries` held-out patients
    # give one image each, included in training independently with probability 1/2.
    canaries: int = 0
    canary_hospitals: list[int] = field(default_factory=lambda: [0])


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


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
    _require(0.0 <= t.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _require(t.max_physical_batch_size >= 0, "training.max_physical_batch_size",
             f"must be >= 0 (0: no limit), got {t.max_physical_batch_size}")
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


def overrides_from_run_config(run_config) -> list[str]:
    """The Hydra overrides a Flower app received (`overrides`: a JSON list in the run config)."""
    import json

    raw = str(run_config.get("overrides", "") or "[]")
    overrides = json.loads(raw)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"run config 'overrides' must be a JSON list of strings, got {raw[:200]}")
    return overrides
