"""Downstream check: does a classifier trained on generated images work on real patients?

Train on synthetic, test on real (TSTR): a small CNN learns the finding (nodule, label 1) from
generated images and is tested on real held-out images; the baseline is the same CNN, same
settings, trained on the real training images and tested on the same held-out images.

The diffusion model is unconditional, so generated images come without labels. They get
pseudo-labels from the baseline classifier itself (trained on the hospitals' real training
images): label 1 where its probability is at least 0.5. Hard labels, not its probabilities:
soft labels would hand the labeller's whole ranking to the second classifier through any
images at all (distillation), and samples without a single nodule would still score well.
Caveats:
- the synthetic-trained classifier can at best learn what the labeller knows, so read its AUC
  against the baseline's, never on its own; with a weak labeller both are weak, and its
  mistakes become label noise;
- the pseudo-labels decide the generated images' prevalence (`pseudo_positive_rate`): a
  generator that drops the finding shows there. If every generated image gets the same label,
  nothing can be learnt: the classifier is that constant (AUC 0.5).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from fedgen.data.dataset import ImageSet

LABELLER_FORMAT = "fedgen-finding-labeller/1"


@dataclass(frozen=True)
class ClassifierSettings:
    width: int = 12
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class DownstreamResult:
    auc: float  # trained on generated images (pseudo-labels), tested on real held-out images
    accuracy: float  # at probability 0.5
    baseline_auc: float  # trained on real training images, same test
    baseline_accuracy: float
    pseudo_positive_rate: float  # share of generated images pseudo-labelled 1
    train_positive_rate: float  # share of label 1 among the real training images
    num_generated: int
    num_train: int
    num_test: int
    num_test_positive: int

    def to_dict(self) -> dict:
        return asdict(self)


class FindingClassifier(nn.Module):
    """images [B,1,H,W] in [-1,1] -> logits [B]. Full-resolution 3x3 convs first (a nodule is a
    couple of pixels at 32x32), then a global max: "is there one anywhere"."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def has_binary_labels(labels: np.ndarray) -> bool:
    """True when every label is 0 or 1 and both occur (the check is possible)."""
    labels = np.asarray(labels)
    return len(labels) > 0 and bool(np.isin(labels, (0, 1)).all()) and len(np.unique(labels)) == 2


def train_classifier(
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: ClassifierSettings = ClassifierSettings(),
    device: str | torch.device = "cpu",
) -> FindingClassifier:
    """Fit FindingClassifier to images [N,1,H,W] and targets [N] in [0, 1] (hard or soft labels)
    by binary cross-entropy. Deterministic in settings.seed; global random state untouched."""
    if len(images) != len(targets) or len(images) == 0:
        raise ValueError(
            f"need as many targets as images (> 0), got {len(targets)} and {len(images)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FindingClassifier(settings.width).to(device)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    targets = targets.float()
    net.train()
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(images), generator=generator).split(settings.batch_size):
            loss = F.binary_cross_entropy_with_logits(
                net(images[batch].to(device)), targets[batch].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def predict(net: FindingClassifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Probabilities of label 1, [N] float64."""
    device = next(net.parameters()).device
    net.eval()
    logits = [net(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
    return torch.sigmoid(torch.cat(logits)).numpy()


def _auc_and_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    accuracy = float(np.mean((probabilities >= 0.5) == (labels == 1)))
    return float(roc_auc_score(labels, probabilities)), accuracy


def load_or_train_labeller(
    path: str | Path,
    training: ImageSet,
    settings: ClassifierSettings = ClassifierSettings(),
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> FindingClassifier:
    """The baseline classifier (the labeller) for `training`'s images and 0/1 labels, cached at
    `path`: every run of a sweep shares its training images, so it is trained once. A file
    trained on other images or settings is refused."""
    path = Path(path)
    fingerprint = labeller_fingerprint(training, settings)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != LABELLER_FORMAT or saved.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{path} is not the finding labeller of these training images and settings "
                f"(fingerprint {saved.get('fingerprint')}; these give {fingerprint}): delete it to retrain"
            )
        net = FindingClassifier(settings.width)
        net.load_state_dict(saved["state_dict"])
        return net.to(device).eval()
    started = time.perf_counter()
    net = train_classifier(
        training.images, torch.from_numpy(np.asarray(training.labels, dtype=np.float32)), settings, device
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    torch.save({"format": LABELLER_FORMAT, "fingerprint": fingerprint, "state_dict": state}, tmp)
    os.replace(tmp, path)  # training is deterministic: concurrent writers write the same weights
    log(f"finding labeller: trained on {len(training)} images in {time.perf_counter() - started:.1f} s -> {path}")
    return net


def labeller_fingerprint(training: ImageSet, settings: ClassifierSettings = ClassifierSettings()) -> str:
    return training.fingerprint(LABELLER_FORMAT, json.dumps(asdict(settings), sort_keys=True))


def downstream_check(
    train_images: torch.Tensor,
    train_labels: np.ndarray,
    test_images: torch.Tensor,
    test_labels: np.ndarray,
    generated: torch.Tensor,
    settings: ClassifierSettings = ClassifierSettings(),
    device: str | torch.device = "cpu",
    labeller: FindingClassifier | None = None,
) -> DownstreamResult:
    """Baseline (real train -> real test) and synthetic (generated, pseudo-labelled -> real test).

    train_images [N,1,H,W] with labels [N] in {0, 1}; test_images [M,1,H,W] with labels [M];
    generated [G,1,H,W]. Both label sets must hold both classes. `labeller`: the baseline
    classifier already trained on these training images with `settings` (`load_or_train_labeller`);
    trained here when None.
    """
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if not has_binary_labels(labels):
            raise ValueError(f"{name} must be 0/1 with both classes present")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if labeller is None:
        labeller = train_classifier(
            train_images, torch.from_numpy(train_labels.astype(np.float32)), settings, device
        )
    baseline_auc, baseline_accuracy = _auc_and_accuracy(test_labels, predict(labeller, test_images))
    pseudo = (predict(labeller, generated) >= 0.5).astype(np.float32)
    if has_binary_labels(pseudo):
        student = train_classifier(generated, torch.from_numpy(pseudo), settings, device)
        auc, accuracy = _auc_and_accuracy(test_labels, predict(student, test_images))
    else:  # one class only: the best classifier is that constant
        auc, accuracy = _auc_and_accuracy(test_labels, np.full(len(test_labels), float(pseudo[0])))
    return DownstreamResult(
        auc=auc,
        accuracy=accuracy,
        baseline_auc=baseline_auc,
        baseline_accuracy=baseline_accuracy,
        pseudo_positive_rate=float(pseudo.astype(np.float64).mean()),
        train_positive_rate=float(train_labels.mean()),
        num_generated=len(generated),
        num_train=len(train_images),
        num_test=len(test_images),
        num_test_positive=int(test_labels.sum()),
    )
