"""The denoising network: a diffusers UNet2DModel built from `ModelConfig`, its DDPM schedule, and
loading a released model. (Where round 0's weights come from is `fedgen.base_model`; what a
hospital trains of it, `fedgen.trainable`.)"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from fedgen.config import ModelConfig


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
