"""A hospital's side of the federation, without Flower: its silo, its ledger, local training, evaluation.

The Flower ClientApp (`clients/app.py`) unpacks a message, calls `Hospital.train` or
`Hospital.evaluate`, and packs the reply. Everything a hospital keeps (its epsilon ledger, its
member/held-out records, its last released update) lives in its own directory `home`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from fedgen.base_model import weights_hash
from fedgen.config import ExperimentConfig
from fedgen.data.silos import Silo, build_silos
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.federation.selection import cells_fingerprint, selection_sigma
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import (
    EpsilonLedger,
    LedgerError,
    TrainingPlan,
    check_delta,
    make_plan,
)
from fedgen.privacy.dp_sgd import privacy_units, train_locally, unit_count
from fedgen.privacy.lifetime import (
    LIFETIME_FILE,
    all_patients,
    check_lifetime_budget,
    largest_patient,
    lifetime_budget,
    record_spend,
    run_entry,
    site_fingerprint,
)
from fedgen.privacy.private_selection import (
    PublicCells,
    noisy_votes,
    selection_epsilon,
    unit_weights,
)
from fedgen.privacy.randomness import privacy_randomness
from fedgen.run_dir import save_torch
from fedgen.seeding import derive_seed, resolve_device, torch_generator
from fedgen.trainable import merge_lora, prepare_training

StateDict = dict[str, torch.Tensor]


@lru_cache(maxsize=2)
def _cached_silos(cfg_json: str) -> list[Silo]:
    # One simulated client process serves several hospitals: build the pool once per config.
    from omegaconf import OmegaConf

    from fedgen.config import to_config

    return build_silos(to_config(OmegaConf.create(json.loads(cfg_json))))


def silos_for(cfg: ExperimentConfig) -> list[Silo]:
    return _cached_silos(json.dumps(asdict(cfg), sort_keys=True))


def state_fingerprint(state: StateDict) -> str:
    """A cheap, exact identity of a model state (to recognise a repeated request)."""
    return weights_hash(state)[:16]


class Hospital:
    """One hospital: `silo` is its data, `home` the directory only it writes to for this run.

    `site` holds its lifetime ledger across runs (`fedgen.privacy.lifetime`); None derives it from
    `home`: a simulated run's `<runs_dir>/<name>/hospitals/hospital-<i>` gives
    `<runs_dir>/sites/<data fingerprint>`, a deployed `<data-dir>/fedgen/<run name>` gives
    `<data-dir>/fedgen`, any other home keeps it in `home`. `site_budget`: the site's own lifetime
    budget, applied with the run's `privacy.lifetime_budget` (the tighter wins)."""

    def __init__(self, cfg: ExperimentConfig, silo: Silo, home: str | Path, site: str | Path | None = None,
                 site_budget: float | None = None):
        self.cfg = cfg
        self.silo = silo
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_fingerprint = site_fingerprint(all_patients(silo), cfg.data.source)
        self.site = Path(site) if site is not None else self._default_site()
        self.lifetime_budget = lifetime_budget(cfg, site_budget)
        # Patient-level DP samples, clips and counts patients: the plan is over them.
        self.units = privacy_units(silo.train.patient_ids, cfg.privacy.unit) if cfg.privacy.enabled else None
        self.num_units = unit_count(self.units, len(silo.train))
        self._answered: tuple[int, str] | None = None  # (round, global model) of the last update this object sent
        if cfg.privacy.enabled and self.num_units:  # (an empty silo is refused by the plan)
            check_delta(cfg.privacy.delta, self.num_units)
        self.device = resolve_device(cfg.training.device)
        self.scheduler = build_scheduler(cfg.model)
        self.diffusion = Diffusion(self.scheduler)
        records = self.home / "records.json"
        if not records.exists():
            records.write_text(json.dumps(silo.records(), indent=1))

    @cached_property
    def plan(self) -> TrainingPlan:
        """DP-SGD's plan (sampling rate, steps): made when training first needs it, so a hospital
        that only votes (`fedgen select`) needs no batch size that fits its silo."""
        fed = self.cfg.federation
        return make_plan(self.num_units, self.cfg.training.batch_size, fed.local_epochs, fed.num_rounds)

    @cached_property
    def template(self) -> StateDict:
        """The UNet's state (names, shapes): how a model packed for the wire is cut back
        (`fedgen.federation.flat_state`)."""
        return build_unet(self.cfg.model, self.cfg.data.image_size).state_dict()

    @property
    def largest_patient(self) -> int:
        return largest_patient(self.silo.train.patient_ids)

    def _default_site(self) -> Path:
        home = self.home.resolve()
        if home.parent.name == "hospitals":
            return home.parents[2] / "sites" / self.data_fingerprint
        return home.parent if home.parent.name == "fedgen" else home

    @property
    def lifetime_path(self) -> Path:
        return self.site / LIFETIME_FILE

    def _lifetime_entry(self, ledger: EpsilonLedger | None, reserve: int = 0, plan: bool = False) -> dict:
        """This run's entry in the site ledger: spent so far, plus `reserve` steps of the round about
        to train, or (`plan`) the rest of the whole plan."""
        history = list(ledger.history) if ledger else []
        extra = max(0, self.plan.total_steps - (ledger.steps if ledger else 0)) if plan else reserve
        more = [(ledger.noise_multiplier, ledger.sample_rate, extra)] if ledger and extra else []
        return run_entry(self.cfg, self.silo.hospital, self.data_fingerprint, self.largest_patient,
                         self.plan.total_steps, history + more if plan else history, [] if plan else more,
                         budget=self.lifetime_budget)

    def check_lifetime(self, ledger: EpsilonLedger | None) -> None:
        """Refuse, before any step, a run whose whole plan would pass the site's lifetime budget."""
        check_lifetime_budget(self.lifetime_path, str(self.home.resolve()), self._lifetime_entry(ledger, plan=True),
                              self.lifetime_budget, f"hospital {self.silo.hospital}")

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.json"

    def open_ledger(self) -> EpsilonLedger | None:
        if not self.cfg.privacy.enabled:
            return None
        return EpsilonLedger.open(self.ledger_path, self.cfg.privacy, self.plan)

    def account(self, recorded: dict | None = None) -> dict:
        """This hospital's privacy account as its ledger holds it, checked against what the
        coordinator `recorded` of it ({"steps", "rounds", "epsilon"}): see `_checked`."""
        return self._checked(self.open_ledger(), recorded)  # an unreadable or edited ledger raises

    def _checked(self, ledger: EpsilonLedger | None, recorded: dict | None) -> dict:
        """The ledger is the authority, but one that holds less than the coordinator saw reported
        (deleted, or an older copy restored) would restart the epsilon count: refuse before any
        step is spent."""
        steps, rounds = (ledger.steps, ledger.trained_rounds) if ledger else (0, [])
        mine = {"hospital": self.silo.hospital, "steps": steps, "epsilon": ledger.epsilon if ledger else 0.0,
                "rounds": rounds, "noise-multiplier": ledger.noise_multiplier if ledger else 0.0,
                "sample-rate": self.plan.sample_rate}
        if ledger is None or not recorded:
            return mine
        missing = sorted(set(recorded.get("rounds", [])) - set(rounds))
        if steps < int(recorded.get("steps", 0)) or missing:
            state = "is missing" if not self.ledger_path.exists() else "holds less than was spent"
            raise LedgerError(
                f"hospital {self.silo.hospital}: its ledger {self.ledger_path} {state}: it records "
                f"{mine['steps']} steps (epsilon {mine['epsilon']:.3f}) in rounds {mine['rounds']}, "
                f"the coordinator recorded {recorded.get('steps')} steps (epsilon "
                f"{float(recorded.get('epsilon', float('nan'))):.3f}) in rounds {recorded.get('rounds')}. "
                "Refusing to train: the epsilon already spent would be lost. Restore the ledger."
            )
        return mine

    def _model(self, state: StateDict) -> torch.nn.Module:
        unet = build_unet(self.cfg.model, self.cfg.data.image_size)
        unet.load_state_dict(state)
        return unet.to(self.device)

    def train(
        self, state: StateDict, server_round: int, proximal_mu: float = 0.0, recorded: dict | None = None
    ) -> tuple[StateDict, dict]:
        """Local training from the global `state`; returns the new state and the metrics to report.
        `recorded` is what the coordinator recorded of this hospital's account (see `account`).

        Asked again for a round it already answered from the same global model (a server that
        restarted mid-round), it re-sends the update it released then: re-releasing the same
        output costs no privacy, while training again would spend epsilon twice.
        """
        fingerprint = state_fingerprint(state)
        cached = self.home / "last_update.pt"
        # This object wrote the file if it answered before: then it knows whether this is a repeat.
        if self._answered in (None, (server_round, fingerprint)) and cached.exists():
            last = torch.load(cached, weights_only=False)
            if last["round"] == server_round and last["input"] == fingerprint:
                return last["state"], last["metrics"]
        ledger = self.open_ledger()
        self._checked(ledger, recorded)
        self.check_lifetime(ledger)
        # The round's steps are on the site's record before the first one is drawn.
        record_spend(self.lifetime_path, str(self.home.resolve()),
                     self._lifetime_entry(ledger, reserve=self.plan.steps_per_round))
        unet = self._model(state)
        seed_parts = (self.cfg.seed, self.silo.hospital, server_round)
        prepare_training(unet, self.cfg.training, seed_parts)  # the rest is sent back unchanged
        result = train_locally(
            unet,
            self.diffusion,
            self.silo.train.images,
            self.cfg,
            self.plan,
            ledger,
            seed_parts=seed_parts,
            server_round=server_round,
            proximal_mu=proximal_mu,
            groups=self.units,
        )
        merge_lora(unet)  # the server averages, and releases, plain UNet weights
        new_state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        metrics = {
            "hospital": self.silo.hospital,
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "epsilon": result.epsilon,
            "delta": result.delta,
            "noise-multiplier": result.noise_multiplier,
            "sample-rate": self.plan.sample_rate,
            "steps": result.steps,
            "total-steps": ledger.steps if ledger else result.steps,
            # 1: this hospital's noise and sampling were derived from the config (no guarantee).
            "reproducible-noise": int(ledger.reproducible_noise) if ledger else 0,
            # Training images of the patient with the most (duplicates included): the privacy
            # card states that patient's epsilon (group privacy), see `privacy_card`.
            "largest-patient": self.largest_patient,
            "train-seconds": result.seconds,
            "train-cpu-seconds": result.cpu_seconds,
        }
        # Ledger first: if the process dies after this line, the spent epsilon is on record.
        if ledger is not None:
            ledger.save(self.ledger_path)
        record_spend(self.lifetime_path, str(self.home.resolve()), self._lifetime_entry(ledger))
        tmp = cached.with_suffix(".tmp")
        torch.save({"round": server_round, "input": fingerprint, "state": new_state, "metrics": metrics}, tmp)
        tmp.replace(cached)
        self._answered = (server_round, fingerprint)
        return new_state, metrics

    def vote(self, cells: PublicCells) -> tuple[torch.Tensor, dict]:
        """Private selection's one release (`fedgen select`): this hospital's votes over the public
        `cells`, each count noised from its secret randomness, and the metrics to report.

        Sigma comes from this hospital's own config (`selection_sigma`), never from the request.
        The release is on the site's lifetime ledger (one Gaussian release: q = 1, 1 step) before
        it is drawn; a release that would pass the lifetime budget is refused. Asked again about
        the same cells, it re-sends the counts it released then (a repeat costs nothing; fresh noise
        would spend the budget twice); about other cells, it refuses."""
        fingerprint, cached = cells_fingerprint(cells), self.home / "selection_vote.pt"
        if cached.exists():
            last = torch.load(cached, weights_only=True)
            if last["cells"] == fingerprint:
                return last["counts"], last["metrics"]
            raise LedgerError(f"hospital {self.silo.hospital}: this run already released its votes, on other cells "
                              f"({cached}); a second release would spend its budget again. Start a new run (name=...)")
        sigma, h = selection_sigma(self.cfg), self.silo.hospital
        entry = run_entry(self.cfg, h, self.data_fingerprint, self.largest_patient, 1, [(sigma, 1.0, 1)] if sigma else [],
                          budget=self.lifetime_budget)
        key = f"{self.home.resolve()}#selection"  # beside, never over, a DP-SGD run's entry
        check_lifetime_budget(self.lifetime_path, key, entry, self.lifetime_budget, f"hospital {h}")
        record_spend(self.lifetime_path, key, entry)
        counts = cells.votes(self.silo.train.images, unit_weights(self.units, len(self.silo.train)))
        reproducible = self.cfg.privacy.reproducible_noise
        if sigma:
            counts = noisy_votes(counts, sigma, privacy_randomness(reproducible, self.cfg.seed, h, "selection"))
        metrics = {"hospital": h, "num-examples": len(self.silo.train), "noise-multiplier": sigma,
                   "epsilon": selection_epsilon(sigma, self.cfg.privacy.delta) if sigma else float("inf"), "delta": self.cfg.privacy.delta,
                   "reproducible-noise": int(bool(sigma) and reproducible), "largest-patient": self.largest_patient}
        save_torch(cached, {"cells": fingerprint, "counts": counts, "metrics": metrics})
        return counts, metrics

    @torch.no_grad()
    def evaluate(self, state: StateDict, draws: int = 4) -> dict:
        """Denoising loss on the validation split (never trained on, not the attacks' held-out),
        with timesteps and noise fixed by the seed so rounds are comparable."""
        images = self.silo.validation.images
        if len(images) == 0:
            return {"hospital": self.silo.hospital, "num-examples": 0, "val-loss": float("nan")}
        unet = evaluation_unet(self.cfg, state, self.device)
        gen = torch_generator(derive_seed(self.cfg.seed, self.silo.hospital, "validation"))
        t, eps = self.diffusion.draw(images, draws, generator=gen)
        losses = []
        for start in range(0, len(images), 64):
            x0 = images[start : start + 64].to(self.device)
            sl = slice(start, start + 64)
            losses.append(
                self.diffusion.per_example_loss(unet_denoiser(unet), x0, t[sl].to(self.device), eps[sl].to(self.device)).cpu()
            )
        return {
            "hospital": self.silo.hospital,
            "num-examples": len(images),
            "val-loss": float(torch.cat(losses).mean()),
        }


_evaluation_unets: dict[str, torch.nn.Module] = {}


def evaluation_unet(cfg: ExperimentConfig, state: StateDict, device: torch.device) -> torch.nn.Module:
    """A UNet holding `state`, for evaluation only: one per process, its weights replaced at each
    call. Building a diffusers UNet took longer than evaluating a small validation split, and a
    simulated worker evaluates tens of hospitals a round, one after the other."""
    key = json.dumps([asdict(cfg.model), cfg.data.image_size, str(device)], sort_keys=True)
    if key not in _evaluation_unets:
        _evaluation_unets.clear()
        _evaluation_unets[key] = build_unet(cfg.model, cfg.data.image_size).to(device).eval()
    unet = _evaluation_unets[key]
    unet.load_state_dict(state)
    return unet
