"""The model a federation starts from (`model.init`): random weights, fedgen's pretrained base, or
any compatible diffusers checkpoint; checked against the config and identified by a content hash.

Every DP image generator that works in practice starts from a model trained on public data and
fine-tunes it privately. fedgen's own base (`model.init=pretrained`) is trained without DP on the
public archive (`fedgen.data.public`, `pretrain.*`) by `fedgen pretrain` and cached under
`<runs_dir>/pretrained/<fingerprint>/`, the fingerprint covering everything that defines it, so
every run that needs the same base finds it trained once. The privacy guarantee covers the
hospitals' fine-tuning data only: the base saw public images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DModel

from fedgen.config import ConfigError, ExperimentConfig
from fedgen.model import build_unet

PRETRAINED = "pretrained"
PRETRAINED_DIR = "pretrained"  # under the runs directory
PRETRAIN_FORMAT = "fedgen-pretrain/1"  # part of the fingerprint: bump when pretraining changes
# What must agree between a base and the config's model for the weights to mean the same thing.
ARCHITECTURE_KEYS = (
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types",
    "up_block_types", "layers_per_block", "add_attention", "attention_head_dim", "norm_num_groups",
)


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and tensor bytes: which weights a run started from."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pretrain_fingerprint(cfg: ExperimentConfig) -> str:
    """Identity of fedgen's base for this config: the archive, the recipe, the network, the size."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("init", "name")}
    key = {"format": PRETRAIN_FORMAT, "pretrain": asdict(cfg.pretrain), "model": model,
           "image_size": cfg.data.image_size}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_home(cfg: ExperimentConfig, runs_dir: str | Path) -> Path:
    """Where fedgen's base for this config lives: pipeline/, checkpoint.pt, pretrain.json."""
    return Path(runs_dir).resolve() / PRETRAINED_DIR / pretrain_fingerprint(cfg)


def base_path(cfg: ExperimentConfig, runs_dir: str | Path) -> Path | None:
    """The folder round 0's weights come from, or None for random weights from the seed."""
    init = cfg.model.init
    if not init:
        return None
    if init == PRETRAINED:
        return pretrained_home(cfg, runs_dir) / "pipeline"
    return Path(init).expanduser().resolve()


def architecture(unet: UNet2DModel) -> dict:
    config = dict(unet.config)
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in config.items() if k in ARCHITECTURE_KEYS}


def load_base(path: str | Path, cfg: ExperimentConfig) -> UNet2DModel:
    """The UNet2DModel saved at `path` (a DDPMPipeline or a UNet2DModel folder), refused with a
    clear error when it is missing, unreadable or of another shape than the config's model."""
    path = Path(path)
    hint = " (run `fedgen pretrain` first)" if PRETRAINED_DIR in path.parts else ""
    if not path.exists():
        raise ConfigError(f"model.init: {path} does not exist{hint}")
    folder = path / "unet" if (path / "unet" / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise ConfigError(f"model.init: {path} is not a diffusers DDPMPipeline or UNet2DModel folder")
    try:
        base = UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
    except Exception as err:  # diffusers and safetensors raise many kinds: all mean "unreadable"
        raise ConfigError(f"model.init: {folder} cannot be read ({type(err).__name__}: {err})") from err
    wanted, found = architecture(build_unet(cfg.model, cfg.data.image_size)), architecture(base)
    differ = [k for k in wanted if found.get(k) != wanted[k]]
    if differ:
        shapes = "; ".join(f"{k}: base {found.get(k)}, config {wanted[k]}" for k in differ)
        raise ConfigError(f"model.init: the base at {path} does not fit the config's model ({shapes})")
    state = base.state_dict()
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ConfigError(f"model.init: the base at {path} holds non-finite weights")
    return base


def initial_unet(cfg: ExperimentConfig, runs_dir: str | Path) -> UNet2DModel:
    """The federation's round-0 global model: the base of `model.init`, or weights drawn from
    `cfg.seed` (so reruns start equal and the utility evaluation can measure the model a run
    started from). Leaves the global torch RNG as it was."""
    path = base_path(cfg, runs_dir)
    if path is not None:
        return load_base(path, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_unet(cfg.model, cfg.data.image_size)


def describe_base(cfg: ExperimentConfig, runs_dir: str | Path, unet: UNet2DModel) -> dict:
    """What a run records of where it started (base.json, the report, the model card)."""
    path = base_path(cfg, runs_dir)
    record = {"init": cfg.model.init or "random", "path": str(path) if path else None,
              "weights_sha256": weights_hash(unet.state_dict())}
    info = path.parent / "pretrain.json" if path is not None else None
    if info is not None and info.exists():
        record["pretrain"] = json.loads(info.read_text())
    return record
