"""The coordinator's side of the federation, without Flower: global model, history, checkpoints,
logging, the released pipeline, and resuming an interrupted run.

The Flower ServerApp (`server/app.py`) drives the rounds; this class is told what happened in
each round and keeps the record. Its view of each hospital's epsilon comes only from the
hospitals' own reports.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from fedgen.base_model import describe_base, initial_unet
from fedgen.config import ExperimentConfig
from fedgen.diffusion import sample_images
from fedgen.federation.update_checks import StateDict
from fedgen.model import build_scheduler
from fedgen.privacy.hospital_level import LEDGER_FILE, HospitalLevelDP
from fedgen.privacy.lifetime import run_lifetimes
from fedgen.privacy.privacy_card import privacy_card
from fedgen.run_dir import RunDir, read_json, save_torch, write_json
from fedgen.seeding import torch_generator
from fedgen.tracking import FederationLogger


class RunFailed(RuntimeError):
    """The run stopped without a release, or released less than configured; metrics.json says why."""

    def __init__(self, metrics: Path, message: str):
        super().__init__(f"{message} (see {metrics})")


def finite_mean(values: list[float]) -> float:
    """Mean over the finite values (a hospital with no validation images reports NaN)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class Coordinator:
    def __init__(self, cfg: ExperimentConfig, run_dir: RunDir, log=print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.scheduler = build_scheduler(cfg.model)
        self.unet = initial_unet(cfg, run_dir.root.parent)
        self.fixed_noise = torch.randn(
            (cfg.federation.num_samples, 1, cfg.data.image_size, cfg.data.image_size),
            generator=torch_generator(cfg.seed, "fixed-noise"),
        )
        checkpoint = run_dir.latest_checkpoint()  # verified: its own weights hash, metrics.json's file hash
        self.start_round = 0
        self.history: list[dict] = []
        self.checkpoint_hashes: dict[str, str] = dict(run_dir.read_metrics().get("checkpoints", {}))
        self.accounts: dict[str, dict] = {}  # the hospitals' own ledgers, from the last roll call
        # The coordinator's own DP (privacy.hospital_level); its ledger file carries across resumes.
        self.hospital_dp = HospitalLevelDP(cfg, run_dir.root / LEDGER_FILE) if cfg.privacy.hospital_level.enabled else None
        if checkpoint is not None:
            self.unet.load_state_dict(checkpoint["model"])
            self.start_round = int(checkpoint["round"])
            self.history = list(checkpoint["history"])
        elif not run_dir.base.exists():  # where round 0 came from, before anything trains on it
            write_json(run_dir.base, describe_base(cfg, run_dir.root.parent, self.unet))
        self.logger = FederationLogger(run_dir.tensorboard)
        self.current: dict = {}
        self.round_started = time.perf_counter()

    @property
    def rounds_left(self) -> int:
        return max(0, self.cfg.federation.num_rounds - self.start_round)

    def global_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    # --- a round, as the ServerApp reports it ------------------------------------------------
    def begin_round(self, server_round: int, sampled: int) -> None:
        self.round_started = time.perf_counter()
        self.current = {
            "round": server_round,
            "started_at": time.time(),  # wall clock, so a benchmark can place rounds in the run
            "sampled": sampled,
            "train": {},
            "evaluate": {},
            "failures": [],
            "rejected": [],
            "spent": {},  # metrics of rejected updates: the hospital spent that epsilon all the same
            "model_unchanged": False,
        }
        # The weights sent this round are the last round's checkpoint; round 1's (the initial model)
        # has none, so a coordinator that records updates keeps them beside the updates.
        if self.cfg.federation.record_updates and not self.run_dir.checkpoint_path(server_round - 1).exists():
            save_torch(self.run_dir.update_path(server_round, "global"), self.global_state())
        # Progress inside a round: the hospitals train in other processes; the round line follows.
        self.log(f"round {server_round}/{self.cfg.federation.num_rounds}: {sampled} hospital(s) training...")

    def record_train(self, hospital: int, metrics: dict) -> None:
        self.current["train"][hospital] = metrics

    def record_failure(self, node: int, reason: str) -> None:
        self.current["failures"].append({"node": node, "reason": reason[-2000:]})
        self.log(f"  ! a hospital (node {node}) failed this round: {reason.strip().splitlines()[-1][:300]}")

    def record_rejection(
        self, hospital: int | None, reason: str, node: int | None = None, spent: dict | None = None
    ) -> None:
        """A reply dropped before aggregation. `hospital` is what the reply claimed (None if it
        could not be read); `node` is Flower's id of the SuperNode that sent it; `spent` its
        readable metrics, whose epsilon counts although the update does not."""
        self.current["rejected"].append({"hospital": hospital, "node": node, "reason": reason})
        if spent is not None and hospital is not None:
            self.current["spent"][hospital] = spent
        who = f"hospital {hospital if hospital is not None else '?'}" + (f" (node {node})" if node is not None else "")
        self.log(f"  ! rejected the update of {who}: {reason}")

    def record_update(self, server_round: int, hospital: int | None, state: StateDict) -> None:
        """The curious coordinator (`federation.record_updates`): keep a state dict it received,
        written at once (only the current one is held): a hospital's returned weights, or with
        `hospital` None the SecAgg+ aggregate, which is all it ever sees then. `fedgen invert`
        attacks them."""
        if not self.cfg.federation.record_updates:
            return
        name = "aggregate" if hospital is None else f"hospital-{hospital}"
        save_torch(self.run_dir.update_path(server_round, name), {k: v.detach().cpu() for k, v in state.items()})

    def record_secure_aggregation(self, info: dict) -> None:
        """A SecAgg+ round: which hospitals' updates were summed (never seen one by one), the
        protocol's threshold and the quantisation error bound (fedgen.federation.secure_aggregation)."""
        self.current["secure_aggregation"] = info

    def record_model_unchanged(self, usable: int, required: int) -> None:
        self.current["model_unchanged"] = True
        self.log(f"  ! {usable} usable update(s), {required} required (federation.min_train_nodes): "
                 "the global model is unchanged this round")

    def required_updates(self, sampled: int) -> int:
        """Usable updates a round needs: every sampled hospital unless min_train_nodes says fewer suffice."""
        if self.hospital_dp is not None:  # every round releases sum + noise (fedgen.privacy.hospital_level)
            return 0
        wanted = self.cfg.federation.min_train_nodes
        return min(wanted, sampled) if wanted else sampled

    def record_hospital_level(self, info: dict) -> None:
        """The round's hospital-level release: updates summed and clipped, noise, epsilon so far."""
        self.current["hospital_level"] = info

    def record_evaluate(self, hospital: int, metrics: dict) -> None:
        self.current["evaluate"][hospital] = metrics

    def end_round(self, server_round: int, state: StateDict) -> None:
        """After aggregation: adopt the new global model, checkpoint, log, print a progress line."""
        self.unet.load_state_dict(state)
        record = self.current
        record["seconds"] = time.perf_counter() - self.round_started
        record["ended_at"] = time.time()
        record["train_loss"] = finite_mean([m["train-loss"] for m in record["train"].values()])
        record["val_loss"] = finite_mean([m["val-loss"] for m in record["evaluate"].values()])
        eps = [m["epsilon"] for m in record["train"].values()]
        record["epsilon_max"] = max(eps) if eps else float("nan")
        self.history.append(record)
        sha = self.run_dir.save_checkpoint(server_round, self.global_state(), self.history)
        self.checkpoint_hashes[str(server_round)] = sha
        self.logger.log_round(record)
        every = self.cfg.federation.sample_every
        if every > 0 and (server_round % every == 0 or server_round == self.cfg.federation.num_rounds):
            self.logger.log_samples(self.samples(), server_round)
        self.write_metrics(status="running")
        n = self.cfg.federation.num_rounds
        self.log(
            f"round {server_round}/{n} | train loss {record['train_loss']:.4f} | "
            f"val loss {record['val_loss']:.4f} | epsilon max {record['epsilon_max']:.3f} "
            f"({self.cfg.privacy.unit + ' level, at each hospital' if self.cfg.privacy.enabled else 'no DP-SGD at the hospitals'}) | "
            + (f"epsilon {record['hospital_level']['epsilon']:.3f} (hospital level, at the coordinator) | "
               if "hospital_level" in record else "")
            + f"{len(record['train'])}/{record['sampled']} hospitals ok | {record['seconds']:.1f} s"
        )

    # --- outputs -----------------------------------------------------------------------------
    def samples(self) -> torch.Tensor:
        f = self.cfg.federation
        # The same noise at every step of every round: grids differ only by the model.
        steps = [torch_generator(self.cfg.seed, "fixed-noise-steps", i) for i in range(len(self.fixed_noise))]
        return sample_images(self.unet, self.scheduler, self.fixed_noise, f.sampling_method, f.sampling_steps, generator=steps)

    def ledgers(self) -> dict:
        """Each hospital's privacy account as it last reported it (the hospital keeps the file),
        rejected updates included: their epsilon was spent. `history` is the composition
        [(sigma, q, steps)] per round. The last roll call's own reading of a hospital's ledger,
        when it holds more steps than were reported, is what the hospital spent."""
        latest: dict = {}
        for record in self.history:
            reported = {**record.get("spent", {}), **record["train"]}
            for h, m in sorted(reported.items(), key=lambda item: int(item[0])):
                entry = latest.setdefault(str(h), {"rounds": [], "history": []})
                entry["rounds"].append({"round": record["round"], "epsilon": m["epsilon"], "steps": m["steps"]})
                entry["history"].append([m["noise-multiplier"], m["sample-rate"], int(m["steps"])])
                entry.update(
                    epsilon=m["epsilon"],
                    delta=m["delta"],
                    noise_multiplier=m["noise-multiplier"],
                    sample_rate=m["sample-rate"],
                    total_steps=m["total-steps"],
                    reproducible_noise=bool(m.get("reproducible-noise", 1)),
                    largest_patient=int(m.get("largest-patient", 1)),
                )
        for h, account in self.accounts.items():
            unreported = int(account["steps"]) - latest.get(h, {}).get("total_steps", 0)
            if unreported > 0:  # spent, never reported (a reply lost after the ledger was saved)
                entry = latest.setdefault(h, {"rounds": [], "history": [], "delta": self.cfg.privacy.delta,
                                              "reproducible_noise": self.cfg.privacy.reproducible_noise})
                entry["history"].append([account["noise-multiplier"], account["sample-rate"], unreported])
                entry.update(epsilon=account["epsilon"], total_steps=account["steps"],
                             noise_multiplier=account["noise-multiplier"], sample_rate=account["sample-rate"])
        return latest

    def recorded_accounts(self) -> dict[str, dict]:
        """What the coordinator knows each hospital spent, sent with every instruction so a
        hospital whose ledger holds less refuses to train (`Hospital.account`)."""
        return {
            h: {"steps": v["total_steps"], "epsilon": v["epsilon"], "rounds": [r["round"] for r in v["rounds"]]}
            for h, v in self.ledgers().items()
        }

    def lost(self) -> list[str]:
        """Each hospital (or node) whose update this run lacks, with the rounds and the last reason."""
        rounds: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        for record in self.history:
            for f in record["failures"]:
                who = f"node {f['node']}"
                rounds.setdefault(who, []).append(record["round"])
                reasons[who] = f["reason"].strip().splitlines()[-1][:300] if f["reason"].strip() else "failed"
            for r in record["rejected"]:
                who = f"hospital {r['hospital']}" if r["hospital"] is not None else f"node {r['node']}"
                rounds.setdefault(who, []).append(record["round"])
                reasons[who] = f"rejected: {r['reason'][:160]}"
        return [f"{who} in round(s) {', '.join(map(str, rounds[who]))} ({reasons[who]})" for who in rounds]

    def trained_as_configured(self) -> bool:
        """No round left the global model unchanged for want of usable updates."""
        return not any(r.get("model_unchanged") for r in self.history)

    def summary(self) -> dict:
        ledgers = self.ledgers()
        eps = [v["epsilon"] for v in ledgers.values()]
        last = self.history[-1] if self.history else {}
        return {
            "epsilon_max": max(eps) if eps else float("nan"),
            "noise_multiplier": max((v["noise_multiplier"] for v in ledgers.values()), default=0.0),
            # Any hospital whose DP noise was reproducible from the config voids the run's guarantee.
            "reproducible_noise": any(v["reproducible_noise"] for v in ledgers.values())
            or bool(self.hospital_dp and self.hospital_dp.reproducible),
            **({"hospital_level_epsilon": self.hospital_dp.ledger.epsilon,
                "hospital_level_noise_multiplier": self.hospital_dp.noise_multiplier} if self.hospital_dp else {}),
            "val_loss": last.get("val_loss", float("nan")),
            "train_loss": last.get("train_loss", float("nan")),
            "rounds_completed": len(self.history),
            "rounds_model_unchanged": [r["round"] for r in self.history if r.get("model_unchanged")],
            "lost": self.lost(),
        }

    def write_metrics(self, status: str, error: str = "") -> None:
        ledgers = self.ledgers()
        write_json(self.run_dir.privacy_card, privacy_card(self.cfg.privacy.enabled, self.cfg.privacy.accountant, ledgers,
                                                            self.cfg.privacy.unit, run_lifetimes(self.run_dir.root),
                                                            self.hospital_dp.to_dict() if self.hospital_dp else None))
        write_json(
            self.run_dir.metrics,
            {
                "status": status,
                "name": self.cfg.name,
                **({"error": error} if error else {}),
                "summary": self.summary(),
                "history": self.history,
                "ledgers": ledgers,
                "checkpoints": self.checkpoint_hashes,  # sha256 of each round's checkpoint file
                # True: the coordinator received only the sum of the hospitals' updates (SecAgg+),
                # so an attack on this run's updates can only attack the aggregate.
                "secure_aggregation": self.cfg.federation.secure_aggregation,
                # The coordinator's hospital-level ledger (privacy.hospital_level), or None when off.
                "hospital_level": self.hospital_dp.to_dict() if self.hospital_dp else None,
                # True: the coordinator kept what it received (updates/), for `fedgen invert`.
                "record_updates": self.cfg.federation.record_updates,
            },
        )

    def stop(self, status: str, error: str) -> None:
        """End the run without releasing: the record says why; the caller raises."""
        self.write_metrics(status=status, error=error)
        self.logger.close()

    def finish(self) -> Path:
        """Release the global model as a plain diffusers pipeline and close the record.
        A non-finite model is never released; a run that lost rounds ends 'incomplete'."""
        from diffusers import DDPMPipeline

        if not all(torch.isfinite(v).all() for v in self.unet.state_dict().values()):
            error = "the global model holds non-finite weights: nothing was released"
            self.stop("failed", error)
            raise RunFailed(self.run_dir.metrics, error)

        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(str(self.run_dir.pipeline))
        summary = self.summary()
        (self.run_dir.pipeline / "README.md").write_text(model_card(self.cfg, summary, read_json(self.run_dir.base)))
        self.logger.log_hparams(self.cfg, summary)
        self.logger.close()
        status = "completed" if self.trained_as_configured() else "incomplete"
        self.write_metrics(status=status)
        return self.run_dir.pipeline


def model_card(cfg: ExperimentConfig, summary: dict, base: dict) -> str:
    """The released pipeline's README: what it is, what it started from, what protects whom."""
    if not cfg.privacy.enabled:
        privacy = ("No DP-SGD at the hospitals." if cfg.privacy.hospital_level.enabled else
                   "None: trained without differential privacy. It may reveal its training images.")
    elif summary.get("reproducible_noise", True):
        privacy = ("None: `privacy.reproducible_noise` derived the DP noise from the config (a test "
                   "switch); the accountant's epsilon is no guarantee.")
    else:
        privacy = (f"Example-level (epsilon, delta)-DP for each hospital's training images: epsilon "
                   f"{summary.get('epsilon_max', float('nan')):.3g} at most, delta {cfg.privacy.delta:g} "
                   f"({cfg.privacy.accountant.upper()} accountant, DP-SGD with secret noise and sampling).")
    h = cfg.privacy.hospital_level
    if h.enabled:  # a second, separate guarantee: the coordinator's, for each hospital as a whole
        privacy += (f" Hospital-level (epsilon, delta)-DP at the coordinator for each hospital's participation and "
                    f"whole silo: epsilon {summary.get('hospital_level_epsilon', float('nan')):.3g}, delta {h.delta:g} "
                    f"(DP-FedAvg: Poisson sampling q_h={h.sample_rate:g}, clipping {h.clipping_norm:g}, "
                    f"{'NO guarantee: noise reproducible from the config' if cfg.privacy.reproducible_noise else 'secret noise'}).")
    start = base.get("path") or "random weights from the config's seed"
    sha = base.get("weights_sha256", "not recorded")
    return (
        f"# fedgen federated diffusion model: {cfg.name}\n\n"
        f"A diffusers `DDPMPipeline` ({cfg.data.image_size}x{cfg.data.image_size}, one channel, model "
        f"`{cfg.model.name}`) trained by {cfg.federation.num_hospitals} hospitals with fedgen (Flower, "
        f"{cfg.federation.strategy}, {summary.get('rounds_completed')} rounds), without pooling their images.\n\n"
        f"- Started from: {start} (weights sha256 `{sha}`). A base trained on public images is not "
        "covered by the guarantee below and may reveal those images.\n"
        f"- Privacy: {privacy}\n"
        "- Load it: `DDPMPipeline.from_pretrained(<this folder>)`.\n"
    )

