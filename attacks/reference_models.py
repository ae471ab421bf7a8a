"""The attacker's reference models: copies of the target's training, run on data it holds itself.

Reference-model attacks (LiRA, RMIA: `attacks.reference`) read a candidate's score on the target
against its scores on models that never saw it. The attacker trains those models itself, without
DP, with the target's architecture, starting weights and training recipe as the released config
states them (`recipe_from_config`), on its own population data (`population_images`): by default
other patients from the public archive's generator, never a hospital's images. Before anything is
trained, `check_disjoint` compares content hashes and refuses a population that holds a candidate
or a training image: a reference that saw a candidate would score it as a member and hide the leak.

Reference j trains on a random subset of the population, the size of the federation's training
data, split into as many pseudo-hospitals as the target had, with FedAvg between them: the same
rounds, local epochs, batch size, optimizer, noise draws, trainable groups and timesteps, and the
same duplication (a pseudo-hospital repeats as many of its images as often as its hospital did:
repeats change what a model memorises, and references without them fit the population better than
the target fits anything, which skews every calibrated score). The rest
of the population is OUT for j, so every population image is a known member of some references
and a non-member of others: what LiRA and RMIA learn a statistic's direction from, and RMIA's
population samples z. Not reproduced: DP (the references are plain by design), the server
strategy (FedProx and FedAdam are trained as FedAvg) and the EMA of local iterates.

Trained references are cached under `<cache dir>/<fingerprint>/ref-<j>.pt`; the fingerprint covers
the population (content), the recipe, the architecture and the starting weights, so a changed
input never reuses a stale model. Each entry records its cost (seconds, optimizer steps).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from fedgen.base_model import weights_hash
from fedgen.config import ExperimentConfig, ModelConfig, TrainingConfig
from fedgen.data.dataset import DataError, ImageSet
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_unet
from fedgen.run_dir import read_json, save_torch, write_json
from fedgen.seeding import derive_seed, torch_generator
from fedgen.trainable import merge_lora, prepare_training

REFERENCE_FORMAT = "fedgen-reference/2"  # part of the fingerprint: bump when training changes
POPULATIONS = ("public", "hospitals")  # or the path of an image folder
GREY_LEVEL = 2.0 / 255  # one 8-bit step in [-1, 1]


@dataclass(frozen=True)
class ReferenceRecipe:
    """What the released config says about how the target was trained.

    silo_sizes: training images per hospital, copies included (the references train as many
    pseudo-hospitals); duplicated: per hospital, (images repeated, extra copies of each), () for none
    """

    model: ModelConfig
    image_size: int
    training: TrainingConfig
    silo_sizes: tuple[int, ...]
    num_rounds: int
    local_epochs: int
    duplicated: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.silo_sizes or min(self.silo_sizes) < 1:
            raise ValueError(f"reference recipe: silo sizes must be >= 1, got {self.silo_sizes}")
        if self.duplicated and (len(self.duplicated) != len(self.silo_sizes)
                                or min(self.distinct_sizes) < 1 or min(min(d) for d in self.duplicated) < 0):
            raise ValueError(f"reference recipe: duplication {self.duplicated} does not fit silos {self.silo_sizes}")
        if self.num_rounds < 1 or self.local_epochs < 1:
            raise ValueError("reference recipe: num_rounds and local_epochs must be >= 1")

    @property
    def train_size(self) -> int:
        return sum(self.silo_sizes)

    @property
    def distinct_sizes(self) -> tuple[int, ...]:
        """Distinct images per hospital: its training images less the extra copies."""
        repeats = self.duplicated or ((0, 0),) * len(self.silo_sizes)
        return tuple(size - count * times for size, (count, times) in zip(self.silo_sizes, repeats))


@dataclass(frozen=True)
class ReferenceSet:
    """k trained reference models and, per model, which population images it trained on.

    trained_on: [k, P] bool over the population's images (P); cost: seconds and optimizer steps
    spent training (0 when every model came from the cache)."""

    models: list[UNet2DModel]
    trained_on: np.ndarray
    fingerprint: str
    home: Path | None
    seconds: float
    steps: int
    cached: int


def recipe_from_config(cfg: ExperimentConfig, silo_sizes: tuple[int, ...],
                       duplicated: tuple[tuple[int, int], ...] = ()) -> ReferenceRecipe:
    fed = cfg.federation
    return ReferenceRecipe(cfg.model, cfg.data.image_size, cfg.training, tuple(int(n) for n in silo_sizes),
                           fed.num_rounds, fed.local_epochs, tuple(duplicated) if any(c for c, _ in duplicated) else ())


FRESH_PATIENTS_AFTER = 100_000  # `fresh` synthetic patients are numbered this far past the federation's


def population_images(cfg: ExperimentConfig, size: int, population: str = "public", fresh: bool = False) -> ImageSet:
    """`size` images the attacker holds, none of them a hospital's.

    "public": patients of the public archive's generator (`fedgen.data.public`) numbered after the
    archive's own, so not even the base model saw them; the archive's scanners, not the hospitals'.
    "hospitals": synthetic patients numbered after the federation's, on the hospitals' scanners
    (the usual assumption of a population from the candidates' distribution); synthetic data only.
    Anything else is read as an image folder (`fedgen.data.loaders`, "folder").
    fresh: synthetic patients from FRESH_PATIENTS_AFTER on, so never one of a reference population
    (the audit's extra non-members, `attacks.targets`).
    """
    from fedgen.data.synthetic import generate_xrays

    if size < 1:
        raise ValueError(f"reference population size must be >= 1, got {size}")
    if population == "public":
        p = cfg.pretrain
        if p.source != "synthetic":
            raise DataError(f"reference population 'public' needs pretrain.source=synthetic (got "
                            f"{p.source!r}); give an image folder instead")
        from fedgen.data.public import PUBLIC_SOURCES

        start, sources, seed, first = p.num_patients, p.num_sources, p.seed, PUBLIC_SOURCES
        images_per_patient, finding_rate = p.images_per_patient, p.finding_rate
    elif population == "hospitals":
        d = cfg.data
        if d.source != "synthetic":
            raise DataError(f"reference population 'hospitals' needs data.source=synthetic (got {d.source!r})")
        start, sources, seed, first = d.num_patients, cfg.federation.num_hospitals, d.seed, 0
        images_per_patient, finding_rate = d.images_per_patient, d.finding_rate
    else:
        from fedgen.data.loaders import load_images

        found = load_images("folder", population, cfg.data.image_size)
        if len(found) < size:
            raise DataError(f"{population}: {len(found)} images, the references need {size}")
        return found.subset(np.arange(size))
    # Patient j's images depend only on (seed, source, j): numbered from `start`, they follow the
    # archive's (or the federation's) own patients, on the same scanners.
    patients = -(-size // images_per_patient)
    if fresh:
        start += FRESH_PATIENTS_AFTER
    elif patients > FRESH_PATIENTS_AFTER:
        raise ValueError(f"reference population: {size} images would reach the audit's fresh patients")
    drawn = generate_xrays(patients, images_per_patient, cfg.data.image_size, sources, finding_rate, seed,
                           first_source=first, first_patient=start)
    return drawn.subset(np.arange(size))


def check_disjoint(population: torch.Tensor, private: torch.Tensor, what: str = "candidates") -> None:
    """Refuse a population [P,1,H,W] that holds an image of `private` [M,1,H,W]: the same 8-bit
    content hash (`ImageSet.content_hashes`), or every pixel within one grey level (a hash misses
    a copy whose float noise crosses a rounding boundary)."""
    def hashes(x: torch.Tensor) -> list[str]:
        return ImageSet(x.cpu(), np.zeros(len(x)), np.zeros(len(x)), np.zeros(len(x))).content_hashes()

    mine = set(hashes(private))
    shared = {i for i, h in enumerate(hashes(population)) if h in mine}
    flat = private.flatten(1).float().cpu()
    for start in range(0, len(population), 256):
        chunk = population[start : start + 256].flatten(1).float().cpu()
        near = (torch.cdist(chunk, flat, p=float("inf")) <= GREY_LEVEL).any(dim=1)
        shared |= {start + int(i) for i in torch.nonzero(near).flatten()}
    if shared:
        first = sorted(shared)
        raise DataError(
            f"the reference population holds {len(first)} of the {what} (population images "
            f"{first[:5]}{'...' if len(first) > 5 else ''}, matched by content hash or within one grey "
            "level): reference models trained on them would score them as members; use a disjoint population"
        )


def reference_fingerprint(population: torch.Tensor, recipe: ReferenceRecipe, init: UNet2DModel, seed: int) -> str:
    pixels = ((population.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    key = {"format": REFERENCE_FORMAT, "population": hashlib.sha256(pixels.tobytes()).hexdigest(),
           "shape": list(population.shape), "recipe": asdict(recipe), "init": weights_hash(init.state_dict()),
           "architecture": {k: v for k, v in init.config.items() if not k.startswith("_")}, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_like_target(init: UNet2DModel, scheduler, silos: list[torch.Tensor], recipe: ReferenceRecipe,
                      seed_parts: tuple) -> tuple[UNet2DModel, int]:
    """FedAvg over `silos` (each [N_h,1,H,W]) with the target's recipe, without DP; returns the
    trained model and the optimizer steps taken. Batches are Poisson samples with q = batch/N_h,
    ceil(1/q) steps an epoch, as the hospitals draw them."""
    tr = recipe.training
    diffusion = Diffusion(scheduler)
    device = next(init.parameters()).device
    glob = copy.deepcopy(init).train()
    low_high = (int(tr.timestep_range[0]), int(tr.timestep_range[1])) if tr.timestep_range else None
    steps = 0
    for rnd in range(recipe.num_rounds):
        states, weights = [], []
        for h, x in enumerate(silos):
            local = copy.deepcopy(glob)
            prepare_training(local, tr, (*seed_parts, h, rnd))
            params = [p for p in local.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=tr.learning_rate) if tr.optimizer == "adam" else torch.optim.SGD(params, lr=tr.learning_rate)
            gen = torch_generator(*seed_parts, "reference-train", h, rnd)
            q = min(1.0, tr.batch_size / len(x))
            for _ in range(recipe.local_epochs * math.ceil(1.0 / q)):
                batch = x[torch.rand(len(x), generator=gen) < q]
                if len(batch) == 0:
                    continue
                t, eps = diffusion.draw(batch, tr.noise_multiplicity, generator=gen, timesteps=low_high)
                loss = diffusion.per_example_loss(unet_denoiser(local), batch.to(device), t.to(device), eps.to(device))
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                opt.step()
                steps += 1
            states.append(merge_lora(local).state_dict())
            weights.append(len(x) / recipe.train_size)
        glob.load_state_dict({k: sum(w * s[k].float() for w, s in zip(weights, states)).to(states[0][k].dtype)
                              for k in states[0]})
    return glob.eval().requires_grad_(False), steps


def train_references(init: UNet2DModel, scheduler, population: torch.Tensor, recipe: ReferenceRecipe,
                     k: int, cache_dir: str | Path | None = None, seed: int = 0, log=print) -> ReferenceSet:
    """k references, reference j on its own random sum(`recipe.distinct_sizes`) images of
    `population` [P,1,H,W], repeated as `recipe.duplicated` says; cached under
    cache_dir/<fingerprint>/ when a cache_dir is given."""
    if k < 1:
        raise ValueError(f"reference models: k must be >= 1, got {k}")
    distinct = sum(recipe.distinct_sizes)
    if distinct >= len(population):
        raise ValueError(f"reference population: {len(population)} images, need more than the "
                         f"{distinct} each reference trains on (some must stay OUT)")
    fingerprint = reference_fingerprint(population, recipe, init, seed)
    home = Path(cache_dir) / fingerprint if cache_dir is not None else None
    models, trained_on, seconds, steps, cached = [], [], 0.0, 0, 0
    for j in range(k):
        rng = np.random.default_rng(derive_seed("reference-subset", seed, j))
        chosen = np.sort(rng.choice(len(population), size=distinct, replace=False))
        mask = np.zeros(len(population), dtype=bool)
        mask[chosen] = True
        path = home / f"ref-{j}.pt" if home is not None else None
        model = build_unet(recipe.model, recipe.image_size)
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=False)
            if not np.array_equal(saved["trained_on"], mask):
                raise DataError(f"{path}: trained on other images than this population's subset {j}; delete it")
            model.load_state_dict(saved["model"])
            cached += 1
        else:
            started = time.perf_counter()
            sizes = np.cumsum((0, *recipe.distinct_sizes))
            silos = [chosen[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
            for h, (count, times) in enumerate(recipe.duplicated):  # the target's repeats, on images of its own
                silos[h] = np.r_[silos[h], np.repeat(rng.choice(silos[h], size=count, replace=False), times)]
            silos = [population[torch.from_numpy(index)] for index in silos]
            trained, n = train_like_target(init, scheduler, silos, recipe, ("reference", seed, j))
            model.load_state_dict(trained.state_dict())
            took = time.perf_counter() - started
            seconds, steps = seconds + took, steps + n
            log(f"  reference model {j + 1}/{k}: {n} steps in {took:.0f} s")
            if path is not None:
                save_torch(path, {"model": model.state_dict(), "trained_on": mask, "steps": n, "seconds": took})
        models.append(model.eval().requires_grad_(False))
        trained_on.append(mask)
    if home is not None:
        info = read_json(home / "references.json")
        write_json(home / "references.json", {**info, "fingerprint": fingerprint, "k": max(k, info.get("k", 0)),
                                              "recipe": asdict(recipe), "population_size": len(population)})
    return ReferenceSet(models, np.stack(trained_on), fingerprint, home, seconds, steps, cached)
