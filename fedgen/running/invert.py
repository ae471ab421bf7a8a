"""`fedgen invert <run dir>`: the curious coordinator inverts an update it kept (`attacks.inversion`).

A run trained with `federation.record_updates=true` holds what its coordinator received:
`updates/round-R/hospital-H.pt` (a hospital's returned weights) or, under secure aggregation,
only `updates/round-R/aggregate.pt` (the mean of the summed hospitals' weights). The attack reads
what the coordinator held and nothing else:

- the run's config.yaml (architecture, schedule, optimizer, learning rate, noise multiplicity K);
- the weights it sent in round R: the checkpoint of round R-1 (round 1: `updates/round-0001/global.pt`);
- the recorded update, and the round's clear metrics in metrics.json (each hospital's steps,
  sample rate q and training-set size N: the expected batch q * N, and its noise multiplier).

Not the images, not which ones were sampled, not the (timestep, noise) draws (secret unless the
run set `privacy.reproducible_noise`; the attack optimises its own either way), not the DP noise.

The hospital's images are rebuilt from the config (checked against the hospital's records.json)
only to score: each reconstruction is matched to its most similar image among the attacked
hospital's training images (the sources) and its held-out and validation images (never trained
on: same scanner, same patients' kind). Against the aggregate, the pool and the sources are those
of every hospital it sums, and the simulated update is one hospital's recipe with their batches
together: exact for one plain SGD step of equally sized hospitals, an approximation otherwise.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attacks.inversion import InversionScore, InversionSettings, LocalRecipe, invert, score
from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import DataError
from fedgen.data.silos import build_silos, check_records
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.run_dir import RunDir, write_json

StateDict = dict[str, torch.Tensor]

THREAT_MODEL = (
    "the curious coordinator: reads only what it held in the round (the run's config, the weights it "
    "sent, the update it received, the round's reported metrics); the hospitals' images are used only "
    "to score the reconstructions"
)


@dataclass(frozen=True)
class Observed:
    """What the coordinator held of one round: the weights it sent (`before`) and what came back
    (`after`: one hospital's weights, or the SecAgg+ mean of `summed` hospitals' weights)."""

    round: int
    hospital: int | None  # None: the aggregate
    summed: list[int]  # the hospitals whose training produced `after`
    before: StateDict
    after: StateDict
    recipe: LocalRecipe
    noise_multipliers: list[float]  # each summed hospital's, as it reported (0: no DP)

    @property
    def target(self) -> str:
        return f"hospital {self.hospital}" if self.hospital is not None else f"the aggregate of hospitals {self.summed}"

    @property
    def folder(self) -> str:
        return f"round-{self.round}-hospital-{self.hospital}" if self.hospital is not None else f"round-{self.round}-aggregate"


def recorded_rounds(run: RunDir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.updates.glob("round-*") if p.is_dir())


def _load_state(path: Path) -> StateDict:
    try:
        data = torch.load(path, weights_only=False)
    except Exception as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    return data.get("model", data)  # a checkpoint carries its weights under "model"


def observed_update(run: RunDir, cfg: ExperimentConfig, server_round: int | None, hospital: int | None) -> Observed:
    """The round's recorded update (default: the first round recorded; hospital 0, or the
    aggregate under secure aggregation) and the recipe the coordinator knows it came from."""
    rounds = recorded_rounds(run)
    if not rounds:
        raise DataError(f"{run.root}: the coordinator recorded no updates in this run; train it with "
                        "federation.record_updates=true (the curious coordinator keeps what it receives)")
    server_round = rounds[0] if server_round is None else server_round
    if server_round not in rounds:
        raise ConfigError(f"--round: the coordinator recorded no update in round {server_round}; "
                          f"recorded rounds: {', '.join(map(str, rounds))}")
    records = {int(r["round"]): r for r in run.read_metrics().get("history", [])}
    if server_round not in records:
        raise DataError(f"{run.metrics}: no record of round {server_round} (the run stopped in it)")
    record = records[server_round]
    aggregate = run.update_path(server_round, "aggregate")
    if aggregate.exists():
        summed = [int(h) for h in record.get("secure_aggregation", {}).get("summed", [])]
        if hospital is not None and hospital not in summed:
            raise ConfigError(f"--hospital: hospital {hospital} is not among those summed in round "
                              f"{server_round} ({summed}); under secure aggregation only their aggregate exists")
        path, target = aggregate, None
    else:
        hospital = 0 if hospital is None else hospital
        path, target, summed = run.update_path(server_round, f"hospital-{hospital}"), hospital, [hospital]
        if not path.exists():
            kept = sorted(int(p.stem.split("-")[1]) for p in path.parent.glob("hospital-*.pt"))
            raise ConfigError(f"--hospital: no update of hospital {hospital} in round {server_round}; "
                              f"recorded: hospital(s) {', '.join(map(str, kept)) or 'none'}")
    previous = run.checkpoint_path(server_round - 1)
    start = previous if previous.exists() else run.update_path(server_round, "global")
    if not start.exists():
        raise DataError(f"{run.root}: neither {previous.name} nor {start} holds the weights sent in round {server_round}")
    metrics = [record["train"][str(h)] for h in summed]
    recipe = LocalRecipe(
        optimizer=cfg.training.optimizer,
        learning_rate=cfg.training.learning_rate,
        steps=max(int(m["steps"]) for m in metrics),
        # The expected batch q * N of each hospital (its real batches are secret Poisson samples).
        batch_size=sum(max(1, round(float(m["sample-rate"]) * float(m["num-examples"]))) for m in metrics),
        noise_multiplicity=cfg.training.noise_multiplicity,
    )
    return Observed(server_round, target, summed, _load_state(start), _load_state(path), recipe,
                    [float(m["noise-multiplier"]) for m in metrics])


def scoring_pool(run: RunDir, cfg: ExperimentConfig, hospitals: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(pool [M,1,H,W], sources): the hospitals' training images (the sources), then their
    held-out and validation images, rebuilt from the config and checked against their records."""
    silos = build_silos(cfg)
    train, others = [], []
    for h in hospitals:
        check_records(silos[h], run.hospital_home(h) / "records.json")
        train.append(silos[h].train.images)
        others += [silos[h].heldout.images, silos[h].validation.images]
    sources = torch.cat(train)
    return torch.cat([sources, *others]), list(range(len(sources)))


def invert_run(
    run_dir: str | Path,
    server_round: int | None = None,
    hospital: int | None = None,
    settings: InversionSettings | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Invert one recorded update of a run, score it, and write into `<run>/invert/round-R-hospital-H/`
    (or `round-R-aggregate/`): invert.json, reconstructions.png (each reconstruction beside its best
    match) and reconstructions.pt (both as tensors); TensorBoard scalars under `attack/inversion/`
    with the round as the step. Returns the report."""
    settings = settings or InversionSettings()
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise DataError(f"{run.root}: no such run directory")
    cfg = run.experiment_config()
    if hospital is not None and not 0 <= hospital < cfg.federation.num_hospitals:
        raise ConfigError(f"--hospital: {hospital} is not one of the run's {cfg.federation.num_hospitals} hospitals")
    seen = observed_update(run, cfg, server_round, hospital)
    if seen.hospital is None:
        log(f"secure aggregation: the coordinator never saw a single hospital's update in round {seen.round}; "
            f"attacking {seen.target}")
    recipe = seen.recipe
    size = cfg.data.image_size
    log(f"inverting round {seen.round}, {seen.target}: {recipe.optimizer} lr {recipe.learning_rate:g}, "
        f"{recipe.steps} local step(s) of about {recipe.batch_size} image(s), K {recipe.noise_multiplicity}; "
        f"{settings.images or recipe.batch_size} candidate(s) at {size}x{size}")
    if cfg.training.trainable != "all" or cfg.training.ema_decay > 0:
        log(f"  note: training.trainable={cfg.training.trainable}, ema_decay={cfg.training.ema_decay:g}: the "
            "attack simulates plain steps on every weight, so it fits this update less well")
    unet = build_unet(cfg.model, size)
    diffusion = Diffusion(build_scheduler(cfg.model))
    started = time.perf_counter()
    result = invert(unet, seen.before, seen.after, diffusion, recipe, (1, size, size), settings, progress=progress)
    seconds = time.perf_counter() - started
    pool, sources = scoring_pool(run, cfg, seen.summed)
    scored = score(result.images, pool, sources)
    report = {
        "run": str(run.root),
        "round": seen.round,
        "hospital": seen.hospital,
        "target": seen.target,
        "secure_aggregation": seen.hospital is None,
        "hospitals_summed": seen.summed,
        "threat_model": THREAT_MODEL + (
            "; secure aggregation: only the mean of the summed hospitals' weights was ever seen, so "
            "this attacks the aggregate" if seen.hospital is None else ""),
        "recipe": asdict(recipe),
        "noise_multipliers": seen.noise_multipliers,
        "settings": asdict(settings),
        "pool": {"images": len(pool), "sources": len(sources),
                 "note": "the attacked hospitals' training images (sources) and their held-out and validation images"},
        "mean_best_ssim": scored.mean_best_ssim,
        "mean_best_psnr": scored.mean_best_psnr,
        "reidentification_rate": scored.reidentification_rate,
        "chance": scored.chance,
        "final_loss": result.losses[-1] if result.losses else None,  # one SGD step: squared distance / the update's; else cosine (+ TV)
        "timesteps_found": [round(float(t), 1) for t in result.timesteps.flatten()],  # [steps x B x K]
        "seconds": seconds,
        "score": scored.to_dict(),
    }
    folder = run.root / "invert" / seen.folder
    write_outputs(folder, run, seen, report, result.images, pool, scored)
    log(f"  mean best SSIM {scored.mean_best_ssim:.3f}, PSNR {scored.mean_best_psnr:.1f} dB, re-identified "
        f"{sum(scored.reidentified)}/{len(scored.reidentified)} (chance {scored.chance:.3f}); "
        f"final loss {report['final_loss']:.4f} ({seconds:.0f} s)")
    log(f"wrote {folder / 'invert.json'} and {folder / 'reconstructions.png'}")
    return report


def pairs(reconstructions: torch.Tensor, pool: torch.Tensor, scored: InversionScore) -> torch.Tensor:
    """Each reconstruction beside its best-matching pool image: [2B,1,H,W]."""
    rows = []
    for r, j in zip(reconstructions, scored.match):
        rows += [r, pool[j]]
    return torch.stack(rows)


def write_outputs(folder: Path, run: RunDir, seen: Observed, report: dict, reconstructions: torch.Tensor,
                  pool: torch.Tensor, scored: InversionScore) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from fedgen.data.images import display_upscale, grid_array, save_grid

    write_json(folder / "invert.json", report)  # (creates the folder)
    grid = pairs(reconstructions, pool, scored)
    torch.save({"reconstructions": reconstructions, "matches": pool[scored.match]}, folder / "reconstructions.pt")
    nrow = min(8, len(grid))
    upscale = display_upscale(grid.shape[-1])
    save_grid(grid, folder / "reconstructions.png", nrow=nrow, upscale=upscale)
    tag = f"attack/inversion/{'aggregate' if seen.hospital is None else f'hospital_{seen.hospital}'}"
    with warnings.catch_warnings(), SummaryWriter(log_dir=str(run.tensorboard)) as tb:
        warnings.simplefilter("ignore")
        tb.add_scalar(f"{tag}/mean_best_ssim", scored.mean_best_ssim, seen.round)
        tb.add_scalar(f"{tag}/mean_best_psnr", scored.mean_best_psnr, seen.round)
        tb.add_scalar(f"{tag}/reidentification_rate", scored.reidentification_rate, seen.round)
        tb.add_scalar(f"{tag}/chance", scored.chance, seen.round)
        tb.add_image(f"{tag}/reconstructions", grid_array(grid, nrow=nrow, upscale=upscale), seen.round,
                     dataformats="HWC")
