"""Feature encoders for the utility metrics: a small CNN trained here, or a local Inception file.

FID proper needs ImageNet Inception weights, which cannot be downloaded in every setting (and
Inception was never meant for 32x32 grey radiographs). So fedgen trains its own encoder on the
real training images (every hospital's members), once, and caches it: every run of a sweep is
then measured with exactly the same feature map, and Frechet distances between runs compare.

Training objective: heads on one 64-d embedding (the features are that embedding, the
penultimate layer), trained on the real training images:
- reconstruction of the clean image from the embedding (an autoencoder, MSE over the pixel
  variance): the embedding must keep the whole image, so global anatomy (lung fields, heart
  size and side, ribs, position) is in the features. A classifier alone would learn to ignore
  whatever does not predict its labels, and a generator could get those things wrong unseen;
- image quality: each batch, a third of the inputs get Gaussian noise and a third a Gaussian
  blur, at random strengths, and a head regresses both strengths (no-reference quality
  assessment from synthetic distortions). Residual noise and over-smoothing are how an
  under-trained or heavily DP-noised diffusion model fails, and a plain autoencoder is nearly
  blind to both (it learns to see through them);
- the acquisition source / hospital (cross-entropy, small weight): keeps each hospital's
  contrast, exposure and field of view apart, so a generator that renders one hospital's style
  only is far from the pooled real images. Left out when there is one source.
Not the finding label by default (`finding_weight=0`): at 32x32 a nodule is a couple of pixels
and a few hundred images do not teach it (held-out AUC ~0.6), so the head memorised the training
images' labels and made training images' features differ from unseen images' (training vs
held-out FD 5x the held-out vs held-out FD): that would inflate the real-vs-real floor and
mix memorisation into the quality score. The downstream check (`fedgen.evaluation.downstream`) covers the finding.
Measured with 300 training images (FD relative to unseen half vs unseen half, two seeds): noise
std 0.3 25-35x, blur sigma 1 px ~10x, left-right flip 50-130x, 2-pixel shift ~25x, one hospital's
images only 150-180x, training images ~1x; mild noise (std 0.1) or blur (0.5 px) only ~2x.

Caching: the file records a fingerprint of the training images (content, order), their labels
and sources, and the settings. A second call with the same fingerprint loads the file; a file
with another fingerprint is refused (FDs from different encoders do not compare; delete the
file or choose another path to retrain). Concurrent callers: the first to finish writes the
file, later ones load it.

Inception: `load_encoder` also accepts pytorch-fid's FID Inception weights file
(pt_inception-2015-12-05-6726825d.pth) when one is at hand; it needs the optional extra
`pip install "fedgen[inception]"` (pytorch-fid, which pulls torchvision).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedgen.data.dataset import ImageSet

ENCODER_FORMAT = "fedgen-feature-encoder/1"
INCEPTION_EXTRA = 'pip install "fedgen[inception]"'
_GRID = 4  # the trunk's output is pooled to 4x4: global layout survives, any image size works


@dataclass(frozen=True)
class EncoderSettings:
    feature_dim: int = 64
    width: int = 16  # channels of the first conv; then 2x and 4x
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    reconstruction_weight: float = 1.0
    source_weight: float = 0.1
    quality_weight: float = 1.0
    finding_weight: float = 0.0  # off: see the module docstring
    max_noise: float = 0.4  # degradations for the quality head: noise std in [-1, 1] units
    max_blur: float = 2.0  # and Gaussian blur sigma in pixels
    seed: int = 0


def conv_trunk(width: int) -> nn.Sequential:
    """Three stride-2 convs: [B,1,H,W] in [-1,1] -> [B, 4*width, 4, 4]."""
    layers: list[nn.Module] = []
    channels = [1, width, 2 * width, 4 * width]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [
            nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(_GRID))


class FeatureNet(nn.Module):
    """forward: images [B,1,H,W] in [-1,1] -> features [B, feature_dim]; plus training heads."""

    def __init__(self, feature_dim: int, width: int, num_sources: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.trunk = conv_trunk(width)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * _GRID**2, feature_dim), nn.SiLU()
        )
        self.source = nn.Linear(feature_dim, max(num_sources, 1))
        self.quality = nn.Linear(feature_dim, 2)  # (noise std, blur sigma), each over its maximum
        self.finding = nn.Linear(feature_dim, 1)
        self.decoder = nn.Sequential(
            nn.Linear(feature_dim, 4 * width * _GRID**2),
            nn.Unflatten(1, (4 * width, _GRID, _GRID)),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] -> images [B, 1, image_size, image_size]."""
        out = self.decoder(features)  # [B, 1, 32, 32]
        if out.shape[-1] != self.image_size:
            out = F.interpolate(
                out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return out


@dataclass
class Encoder:
    """A frozen feature map, images [N,1,H,W] in [-1,1] -> features [N, D].

    kind: "trained" (fedgen's own CNN) or "inception" (pytorch-fid pool3, D = 2048).
    fingerprint: identifies the encoder; runs compare only when theirs is the same.
    image_size: the size a trained encoder was made for (None: any).
    sources: the acquisition sources its source head tells apart, in head order (empty: no head).
    """

    network: nn.Module
    kind: str
    fingerprint: str
    path: Path
    image_size: int | None
    sources: tuple[str, ...] = ()

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """images [N,1,H,W] in [-1,1] -> float64 array [N, D]."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be [N, 1, H, W], got {tuple(images.shape)}")
        if self.image_size is not None and images.shape[-1] != self.image_size:
            raise ValueError(
                f"the encoder {self.path} was trained on {self.image_size}x{self.image_size} images, "
                f"got {images.shape[-1]}x{images.shape[-2]}"
            )
        device = next(self.network.parameters()).device
        self.network.eval()
        out = [self.network(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def source_shares(self, images: torch.Tensor) -> dict[str, float] | None:
        """The share of `images` the source head assigns to each source (None without a head).

        Why: the features keep each hospital's style apart, so a generator that draws one
        hospital's style more often than the real images do is far from them in Frechet distance
        even when every sample is a good image (a 30/70 mix of real training images: FD 8x that of
        the 50/50 mix). These shares tell that apart from bad images."""
        if len(self.sources) < 2 or not isinstance(self.network, FeatureNet):
            return None
        features = torch.from_numpy(self.features(images)).float()
        device = next(self.network.parameters()).device
        votes = self.network.source(features.to(device)).argmax(1).cpu()
        counts = torch.bincount(votes, minlength=len(self.sources)).double() / max(len(images), 1)
        return {name: float(c) for name, c in zip(self.sources, counts)}


def encoder_fingerprint(data: ImageSet, settings: EncoderSettings) -> str:
    """16 hex digits from the images (8-bit content, in order), labels, sources and settings."""
    return data.fingerprint(ENCODER_FORMAT, json.dumps(asdict(settings), sort_keys=True))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image x [B,1,H,W] with its own Gaussian sigma [B] (pixels; 0 leaves it as is)."""
    radius = max(1, int(np.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-3).to(x.dtype)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K], separable
    b, _, h, w = x.shape
    padded = F.pad(x.reshape(1, b, h, w), (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel[:, None, None, :], groups=b)
    return F.conv2d(rows, kernel[:, None, :, None], groups=b).reshape(b, 1, h, w)


def degrade(
    x: torch.Tensor, settings: EncoderSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A third of the images kept, a third with Gaussian noise, a third blurred, at random strengths.

    x [B,1,H,W]. Returns the degraded images [B,1,H,W] (clipped to [-1, 1]) and targets [B, 2]:
    (noise std / max_noise, blur sigma / max_blur), zero where not applied.
    """
    b = len(x)
    kind = torch.randint(0, 3, (b,), generator=generator)
    strength = torch.rand(b, generator=generator)
    noise_std = torch.where(kind == 1, strength * settings.max_noise, torch.zeros(b))
    blur_sigma = torch.where(kind == 2, strength * settings.max_blur, torch.zeros(b))
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    out = (
        gaussian_blur(x, blur_sigma.to(x.device))
        + noise_std.to(x.device)[:, None, None, None] * eps
    )
    targets = torch.stack([noise_std / settings.max_noise, blur_sigma / settings.max_blur], dim=1)
    return out.clamp(-1, 1), targets.to(x.device)


def train_encoder(
    data: ImageSet,
    settings: EncoderSettings = EncoderSettings(),
    device: str | torch.device = "cpu",
) -> FeatureNet:
    """Train FeatureNet on `data` (see the module docstring for the objective). Deterministic in
    settings.seed on a given device; leaves torch's global random state as it was."""
    if len(data) < 2:
        raise ValueError(f"the feature encoder needs at least 2 training images, got {len(data)}")
    source_names, source_index = np.unique(data.sources, return_inverse=True)
    sources = torch.from_numpy(source_index.astype(np.int64))
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32))
    known = labels >= 0
    use_finding = bool(known.any()) and settings.finding_weight > 0
    use_source = len(source_names) >= 2 and settings.source_weight > 0
    images = data.images.float()
    pixel_var = float(images.var()) or 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FeatureNet(
            settings.feature_dim, settings.width, len(source_names), data.image_size
        ).to(device)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    net.train()
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(data), generator=generator).split(settings.batch_size):
            clean = images[batch].to(device)
            x, quality = degrade(clean, settings, generator)
            f = net(x)
            # The clean image is the target: anatomy must come through whatever the degradation.
            loss = (
                settings.reconstruction_weight * F.mse_loss(net.reconstruct(f), clean) / pixel_var
            )
            loss = loss + settings.quality_weight * F.mse_loss(net.quality(f), quality)
            if use_source:
                loss = loss + settings.source_weight * F.cross_entropy(
                    net.source(f), sources[batch].to(device)
                )
            mask = known[batch].to(device)
            if use_finding and mask.any():
                logits = net.finding(f).squeeze(1)[mask]
                targets = labels[batch].to(device)[mask]
                loss = loss + settings.finding_weight * F.binary_cross_entropy_with_logits(
                    logits, targets
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval()


def _save(
    path: Path, net: FeatureNet, fingerprint: str, settings: EncoderSettings, data: ImageSet
) -> bool:
    """Write the encoder unless `path` exists already; True if this call wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "format": ENCODER_FORMAT,
            "fingerprint": fingerprint,
            "settings": asdict(settings),
            "image_size": data.image_size,
            "sources": sorted({str(s) for s in data.sources}),
            "num_images": len(data),
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
        },
        tmp,
    )
    try:
        os.link(tmp, path)  # atomic, and fails if another process wrote the file first
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: last writer wins instead
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """An encoder file: fedgen's own (from `load_or_train_encoder`) or pytorch-fid's Inception weights."""
    path = Path(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a fedgen encoder or an Inception weights file")
    if saved.get("format") == ENCODER_FORMAT:
        s = saved["settings"]
        net = FeatureNet(s["feature_dim"], s["width"], len(saved["sources"]), saved["image_size"])
        net.load_state_dict(saved["state_dict"])
        return Encoder(
            net.to(device).eval(), "trained", saved["fingerprint"], path, saved["image_size"],
            tuple(saved["sources"]),
        )
    if any(str(k).startswith("Mixed_7c.") for k in saved):
        return _inception_encoder(path, saved, device)
    raise ValueError(
        f"{path}: not a fedgen encoder ({ENCODER_FORMAT}) or pytorch-fid Inception weights"
    )


def load_or_train_encoder(
    path: str | Path,
    data: ImageSet,
    settings: EncoderSettings = EncoderSettings(),
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> Encoder:
    """The encoder cached at `path`, trained on `data` first if the file does not exist.

    Refuses a cached fedgen encoder whose fingerprint is not that of `data` and `settings`.
    An Inception file at `path` is used as it is (`data` is then not used).
    """
    path = Path(path)
    fingerprint = encoder_fingerprint(data, settings)
    if not path.exists():
        started = time.perf_counter()
        net = train_encoder(data, settings, device)
        if _save(path, net, fingerprint, settings, data):
            log(
                f"feature encoder: trained on {len(data)} images in {time.perf_counter() - started:.1f} s -> {path}"
            )
            return Encoder(net, "trained", fingerprint, path, data.image_size,
                           tuple(sorted({str(s) for s in data.sources})))
        log(f"feature encoder: another process wrote {path} first; using that one")
    encoder = load_encoder(path, device)
    if encoder.kind == "trained" and encoder.fingerprint != fingerprint:
        raise ValueError(
            f"{path} is a feature encoder trained on other images or settings (fingerprint "
            f"{encoder.fingerprint}; these give {fingerprint}). Distances from different encoders do "
            "not compare: delete the file or choose another path to train a new one."
        )
    return encoder


class _InceptionFeatures(nn.Module):
    """Grey images [B,1,H,W] in [-1,1] -> pytorch-fid pool3 features [B, 2048]."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)  # pytorch-fid takes RGB in [0, 1]
        return self.inception(rgb)[0].flatten(1)


def _inception_encoder(path: Path, state_dict: dict, device: str | torch.device) -> Encoder:
    try:
        from pytorch_fid import inception
    except ImportError as e:
        raise ImportError(
            f"{path} is an Inception weights file; using it needs pytorch-fid: {INCEPTION_EXTRA}"
        ) from e
    # pytorch-fid only knows how to download its weights: hand it the local file instead.
    with mock.patch.object(
        inception, "load_state_dict_from_url", lambda *args, **kwargs: state_dict
    ):
        net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Encoder(
        _InceptionFeatures(net).to(device).eval(), "inception", f"inception-{digest}", path, None
    )
