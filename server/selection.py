"""ServerApp, `fedgen select`: private selection as one Flower round.

The coordinator draws the public pool and its cells, sends them to every hospital (a
`query.select` message), and sums the noisy counts that come back into the cells' weights. It
writes the release (`selection.pt`: the base, named by path and hash, and the weights), a summary
(`selection.json`, `metrics.json`), and a grid of the base's samples beside the selection's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedgen.base_model import base_path, initial_unet, weights_hash
from fedgen.config import ExperimentConfig
from fedgen.data.images import save_grid
from fedgen.federation.hospital import silos_for
from fedgen.federation.selection import (
    SelectionRelease,
    base_sampler,
    plan_selection,
    pool_cache,
    public_cells,
    silo_unit_counts,
)
from fedgen.model import build_scheduler
from fedgen.privacy.lifetime import run_lifetimes
from fedgen.privacy.privacy_card import privacy_card
from fedgen.privacy.private_selection import selection_epsilon
from fedgen.run_dir import RunDir, write_json
from fedgen.tracking import FederationLogger


def check_vote(msg: Message, k: int, hospitals: int, seen: set[int]) -> tuple[int | None, torch.Tensor | None, str | None]:
    """(hospital, its noisy counts, why the reply is unusable or None). Nothing in a reply is trusted."""
    if msg.has_error():
        return None, None, str(msg.error.reason).strip().splitlines()[-1] if msg.error.reason else "failed"
    metrics = dict(msg.content.metric_records.get("metrics", {}))
    hospital = metrics.get("hospital")
    if not isinstance(hospital, int) or not 0 <= hospital < hospitals or hospital in seen:
        return None, None, f"reply names no new hospital of this federation ({hospital!r})"
    try:
        counts = msg.content.array_records["votes"].to_torch_state_dict()["counts"].double()
    except Exception as err:  # a hostile payload may not even decode
        return hospital, None, f"unreadable votes ({type(err).__name__}: {err})"
    if counts.shape != (k,) or not bool(torch.isfinite(counts).all()):
        return hospital, None, f"votes of shape {tuple(counts.shape)} (finite: {bool(torch.isfinite(counts).all())}); {k} cells were sent"
    return hospital, counts, None


def configured_unit_counts(cfg: ExperimentConfig) -> list[int]:
    """The hospitals' training images (or patients) as the config describes them: public (DP-SGD's
    q reveals them too), and needed only to set K. A deployed coordinator that cannot build the
    hospitals' silos (their own data) is told to set K itself."""
    try:
        silos = silos_for(cfg)
    except Exception as err:
        if cfg.selection.cells:  # K is given: the counts only label the plan
            return [0] * cfg.federation.num_hospitals
        raise RuntimeError(f"selection.cells: the coordinator cannot count the hospitals' images ({err}); "
                           "set K, e.g. selection.cells=32") from err
    return silo_unit_counts(cfg, silos)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def run_selection(grid: Grid, cfg: ExperimentConfig, run_dir: RunDir, say: Callable[[str], None]) -> None:
    fed = cfg.federation
    plan = plan_selection(cfg, configured_unit_counts(cfg))
    noise = f"sigma {plan.sigma:.2f} per count, epsilon {plan.epsilon:.3g} per hospital" if plan.sigma else "no noise (privacy off: no guarantee)"
    say(f"selection: {plan.votes} votes from {plan.hospitals} hospitals into {plan.cells} cells; {noise}")
    base, path = initial_unet(cfg, cfg.runs_dir), base_path(cfg, cfg.runs_dir)
    base_sha256 = weights_hash(base.state_dict())
    draw = base_sampler(cfg, base, build_scheduler(cfg.model))
    cells = public_cells(cfg, draw, plan.cells, say, cache=pool_cache(cfg, base_sha256))
    nodes = wait_for_nodes(grid, max(fed.min_available_nodes, fed.min_train_nodes or fed.num_hospitals), fed.round_timeout)
    record = ArrayRecord({"pool": cells.pool.reshape(-1, *cells.image_shape), "labels": cells.labels})
    messages = [Message(RecordDict({"cells": record}), dst_node_id=n, message_type="query.select") for n in nodes]
    say(f"selection: asking {len(nodes)} hospitals for their noisy votes")
    released: dict[int, torch.Tensor] = {}
    reported: dict[int, dict] = {}  # each voter's metrics: what it says it spent
    lost: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout):
        hospital, counts, problem = check_vote(reply, plan.cells, fed.num_hospitals, set(released))
        if problem or hospital is None or counts is None:
            lost.append(f"node {reply.metadata.src_node_id}: {problem}")
            continue
        released[hospital] = counts
        reported[hospital] = dict(reply.content.metric_records["metrics"])
        say(f"selection: hospital {hospital} voted")
    if len(nodes) > len(released) + len(lost):  # asked, and never answered
        lost.append(f"{len(nodes) - len(released) - len(lost)} hospital(s) sent no reply within federation.round_timeout")
    required = fed.min_train_nodes or fed.num_hospitals
    if len(released) < required:
        error = f"{len(released)} hospitals voted, {required} needed"
        write_json(run_dir.metrics, {"status": "failed", "error": error, "summary": {"lost": lost}})
        raise RuntimeError(error)
    release = SelectionRelease.assemble(plan, str(path), base_sha256, cells, released)
    release.save(run_dir.root / "selection.pt")
    _show(cfg, run_dir, release, draw, say)
    summary = {"method": "private selection", "cells": plan.cells, "noise_multiplier": plan.sigma,
               "epsilon_per_hospital": plan.epsilon, "delta": plan.delta, "hospitals_voted": sorted(released),
               "base": str(path), "base_sha256": release.base_sha256, "weights": release.weights.tolist(),
               "guarantee": "the hospitals' training images, in one Gaussian release of their votes; the base "
                            "and the pool are public and are not covered"}
    write_json(run_dir.root / "selection.json", summary)
    write_json(run_dir.privacy_card, selection_card(cfg, run_dir, reported))
    write_json(run_dir.metrics, {"status": "completed", "selection": summary, "summary": {"lost": lost}})


def selection_card(cfg: ExperimentConfig, run_dir: RunDir, reported: dict[int, dict]) -> dict:
    """The run's privacy card (`privacy.json`), as a trained run's: each voter's one release
    (sigma, q = 1, 1 step) as it reported it, its epsilon recomputed from that, and its site's
    lifetime spend."""
    ledgers = {str(h): {"history": [[float(m["noise-multiplier"]), 1.0, 1]] if m["noise-multiplier"] else [],
                        "epsilon": float(m["epsilon"]), "delta": float(m["delta"]),
                        "largest_patient": int(m["largest-patient"]), "reproducible_noise": bool(m["reproducible-noise"])}
               for h, m in sorted(reported.items())}
    card = privacy_card(cfg.privacy.enabled, "rdp", ledgers, cfg.privacy.unit, run_lifetimes(run_dir.root),
                        mechanism="private selection (one Gaussian release of its votes)",
                        sampling="none: every training unit votes once, in one release (q = 1, 1 step)")
    for entry in card["hospitals"].values():  # recomputed as the hospital computed it: RDP orders to 1000
        entry.update(accountant="rdp (orders to 1000, for one Gaussian release)",
                     epsilon_recomputed=selection_epsilon(entry["history"][0][0], entry["delta"]))
    return card


def _show(cfg: ExperimentConfig, run_dir: RunDir, release: SelectionRelease,
          draw: Callable[[int, int], torch.Tensor], say: Callable[[str], None]) -> None:
    """The selection's samples and the base's from the same public draws: PNGs and TensorBoard."""
    n, seed = cfg.selection.num_samples, cfg.seed
    say(f"selection: drawing {n} selected samples (rejection sampling from the base)")
    selected, drawn = release.sample(draw, n, seed, say)
    base_samples = draw(n, release.first_draw_seed(seed))  # the sampler's first draws: the base as it is
    say(f"selection: kept {n} of {drawn} base samples ({n / drawn:.0%})")
    upscale = max(1, 64 // cfg.data.image_size)
    save_grid(base_samples, run_dir.root / "selection_base.png", upscale=upscale)
    save_grid(selected, run_dir.root / "selection.png", upscale=upscale)
    logger = FederationLogger(run_dir.tensorboard)
    logger.log_samples(base_samples, 0, tag="selection/base")
    logger.log_samples(selected, 1, tag="selection/selected")
    logger.close()

