"""The typed schema behind Hydra's `conf/`: one dataclass per config section, and `ConfigError`.

Composition and the checks of impossible settings are `fedgen.config`, which re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedgen.hospital_level_schema import HospitalLevelConfig


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
    # The plain default; conf/training/default.yaml, the demo's DP recipe, sets 128 (less noise per example).
    batch_size: int = 32  # expected (logical) batch size: Poisson sample rate q = batch_size / N
    learning_rate: float = 2e-3
    # constant | cosine: the rate falls from learning_rate to 0 along a half cosine over every step
    # the whole training plans (all rounds): DP-SGD's noise floor scales with the rate.
    lr_schedule: str = "constant"
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
    # [low, high): the hospitals train on these diffusion timesteps only (null: all). The others keep
    # what the base learned: a DP fine-tune spends its budget where the private images differ from
    # the public ones (their global style is set at the high-noise steps). DPDM and DP-SynGen
    # (REFERENCES.md) likewise move the training's noise levels for DP.
    timestep_range: list[int] | None = None
    # > 0: DP-SGD in the top-k directions of public images' per-example gradients, found at each
    # round's start (projected DP-SGD, fedgen.privacy.gradient_subspace): the noise is k-dimensional.
    gradient_subspace: int = 0
    subspace_images: int = 256  # public images (pretrain.*'s archive) the directions are found on


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
    # simulation on one machine: hospitals that train at once (0: every hospital of a small
    # federation, else one per core; at most 8: `fedgen.running.simulate.parallel_hospitals`).
    parallel_clients: int = 0
    client_gpus: float = -1.0  # simulation: GPUs per simulated hospital; -1 = 1 if CUDA is present


@dataclass
class AuditConfig:
    # One-run audit (Steinke, Nasr & Jagielski 2023): per hospital, `canaries` held-out patients
    # give one image each, included in training independently with probability 1/2.
    canaries: int = 0
    canary_hospitals: list[int] = field(default_factory=lambda: [0])


@dataclass
class SelectionConfig:
    """`fedgen select`: private selection (`fedgen.privacy.private_selection`). The budget is
    privacy.target_epsilon and privacy.delta, spent in one release; privacy=none votes without noise."""

    pool_size: int = 2048  # public pool: base samples the hospitals' images vote on
    pool_seed: int = 777  # public: any party can draw the pool (and its cells) again
    cells: int = 0  # K; 0 sets it from public quantities (`cluster_count`: silo sizes, sigma)
    num_samples: int = 64  # selected samples the run draws for its grid (rejection sampling)
    eval_samples: int = 256  # selected (and base) samples the evaluation measures (FD, precision, DCR)


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
    selection: SelectionConfig = field(default_factory=SelectionConfig)
