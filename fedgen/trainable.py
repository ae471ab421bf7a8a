"""What a hospital trains: named parameter groups of the UNet and LoRA adapters (peft), and the
merge that turns a model with adapters back into a plain diffusers UNet for sending and release.

Fewer trained coordinates mean less DP noise in total (its norm grows with the square root of
their number) for the same signal: DP-LDM and DP-LoRA fine-tune attention layers or low-rank
adapters only. With `lora` among `training.trainable`, each local training wraps the layers named
by `training.lora_targets` in fresh rank-r adapters (B = 0, so round 0's model is unchanged),
trains only those (and any other group named with it), and merges B·A·alpha/r into the weights
before the update leaves the hospital: the server averages plain weights, the release is a plain
UNet2DModel, and the parameters outside the adapters and groups come back bit-identical.
"""

from __future__ import annotations

import torch

from fedgen.config import ConfigError, TrainingConfig
from fedgen.seeding import derive_seed

LORA = "lora"
TRAINABLE_GROUPS = {
    "all": lambda name: True,
    "norms_biases": lambda name: "norm" in name or name.endswith(".bias"),
    "attention": lambda name: "attentions." in name,
    "up_blocks": lambda name: name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")),
    "down_blocks": lambda name: name.startswith(("conv_in.", "down_blocks.")),
    "mid_block": lambda name: name.startswith("mid_block."),
    # The output head: the last norm and convolution (a few hundred coordinates at the tiny
    # model). Global tone (exposure, contrast) is a shift and scale of what the head draws.
    "head": lambda name: name.startswith(("conv_norm_out.", "conv_out.")),
}


def _groups(spec: str) -> list[str]:
    groups = [g.strip() for g in spec.split("+")]
    unknown = [g for g in groups if g != LORA and g not in TRAINABLE_GROUPS]
    if unknown:
        raise ConfigError(
            f"training.trainable: unknown group(s) {unknown}; known: {', '.join([*TRAINABLE_GROUPS, LORA])}"
        )
    return groups


def uses_lora(cfg: TrainingConfig) -> bool:
    return LORA in _groups(cfg.trainable)


def _check_lora_targets(unet: torch.nn.Module, cfg: TrainingConfig) -> None:
    """peft matches a target by the end of a module's name; name the ones that match nothing."""
    if cfg.lora_rank < 1:
        raise ConfigError(f"training.lora_rank must be at least 1 with training.trainable={cfg.trainable} (got {cfg.lora_rank})")
    if not cfg.lora_targets:
        raise ConfigError("training.lora_targets is empty: name the layers to adapt (e.g. conv1, to_q)")
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    missing = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in layers} | {".".join(n.split(".")[-2:]) for n in layers if n.split(".")[-1].isdigit()})
        raise ConfigError(
            f"training.lora_targets: {missing} name(s) no Conv2d or Linear layer of this model; "
            f"its layers end in: {', '.join(kinds)}"
        )


def add_lora(unet: torch.nn.Module, cfg: TrainingConfig, seed_parts: tuple = ()) -> None:
    """Wrap the target layers in fresh LoRA adapters (peft), in place. A is drawn from the seed
    (it is data-independent, so public), B starts at zero."""
    from peft import LoraConfig  # peft pulls in transformers: import it only when asked for
    from peft.tuners.lora import LoraModel

    _check_lora_targets(unet, cfg)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, uses it as a float scale
                        target_modules=list(cfg.lora_targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*seed_parts, "lora-init"))
        LoraModel(unet, config, "default")


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its layer and put the plain layer back: the same module names and
    state-dict keys as before `add_lora`. A no-op for a model without adapters."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # refuses adapters that would put NaN or inf in the weights
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.get_base_layer())
    return unet


def prepare_training(unet: torch.nn.Module, cfg: TrainingConfig, seed_parts: tuple = ()) -> int:
    """Set `requires_grad` on exactly what `cfg.trainable` selects (adding LoRA adapters if it
    names `lora`); returns how many coordinates are trained."""
    groups = _groups(cfg.trainable)
    if groups == ["all"]:
        unet.requires_grad_(True)
        return sum(p.numel() for p in unet.parameters())
    named = [g for g in groups if g != LORA]
    selected = {n for n, _ in unet.named_parameters() if any(TRAINABLE_GROUPS[g](n) for g in named)}
    if named and not selected:
        raise ConfigError(f"training.trainable: '{'+'.join(named)}' selects no parameter of this model")
    if LORA in groups:
        add_lora(unet, cfg, seed_parts)
    for name, p in unet.named_parameters():
        # (after add_lora a wrapped layer's own weight is named "<layer>.base_layer.weight")
        p.requires_grad_(name in selected or ".lora_" in name or name.replace(".base_layer", "") in selected)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)
