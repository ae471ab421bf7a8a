"""The denoising network: a diffusers UNet2DModel built from `ModelConfig`, its DDPM schedule, the
parameter groups a hospital may train, and loading a released model. (Where round 0's weights
come from is `fedgen.base_model`.)"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedgen.config import ConfigError, ModelConfig

# Parameter groups for DP fine-tuning (`training.trainable`): fewer trained coordinates mean less
# DP noise in total (its norm grows with the square root of their number) for the same signal.
TRAINABLE_GROUPS = {
    "all": lambda name: True,
    "norms_biases": lambda name: "norm" in name or name.endswith(".bias"),
    "attention": lambda name: "attentions." in name,
    "up_blocks": lambda name: name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")),
    "down_blocks": lambda name: name.startswith(("conv_in.", "down_blocks.")),
    "mid_block": lambda name: name.startswith("mid_block."),
}


def build_unet(cfg: ModelConfig, image_size: int) -> UNet2DModel:
    """A one-channel UNet2DModel predicting the noise eps. Plain diffusers: saves and loads as such."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        layers_per_block=cfg.layers_per_block,
        add_attention=cfg.mid_block_attention,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The DDPM noise schedule (betas, alpha-bars) that training, sampling and the attacks share."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def trainable_names(unet: torch.nn.Module, spec: str) -> set[str]:
    """Names of the parameters `spec` ("all", or groups joined by "+") selects."""
    groups = [g.strip() for g in spec.split("+")]
    unknown = [g for g in groups if g not in TRAINABLE_GROUPS]
    if unknown:
        raise ConfigError(f"training.trainable: unknown group(s) {unknown}; known: {', '.join(TRAINABLE_GROUPS)}")
    names = {n for n, _ in unet.named_parameters() if any(TRAINABLE_GROUPS[g](n) for g in groups)}
    if not names:
        raise ConfigError(f"training.trainable: '{spec}' selects no parameter of this model")
    return names


def freeze_all_but(unet: torch.nn.Module, spec: str) -> int:
    """Train only the parameters `spec` selects; returns how many coordinates that is."""
    names = trainable_names(unet, spec)
    for name, p in unet.named_parameters():
        p.requires_grad_(name in names)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def count_parameters(model: UNet2DModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_released(path: str | Path):
    """(unet, scheduler) from a run directory or any diffusers DDPMPipeline / UNet2DModel folder."""
    from diffusers import DDPMPipeline

    path = Path(path)
    if (path / "pipeline" / "model_index.json").exists():
        path = path / "pipeline"
    if (path / "model_index.json").exists():
        pipe = DDPMPipeline.from_pretrained(str(path), low_cpu_mem_usage=False)
        return pipe.unet.eval(), pipe.scheduler
    if (path / "config.json").exists():  # a bare UNet2DModel folder: assume the standard schedule
        return UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False).eval(), DDPMScheduler(num_train_timesteps=1000)
    raise FileNotFoundError(f"{path}: no diffusers pipeline (model_index.json) or UNet (config.json)")
