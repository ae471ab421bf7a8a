"""`fedgen simulate`: a federation of simulated hospitals on this machine, through Flower's own path.

Compose and check the config, plan each hospital's privacy, prepare (or resume) the run directory,
start a local SuperLink in simulation mode, submit the app with `flwr run`, stream its progress,
and stop every process it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from fedgen.config import CONF_DIR, ConfigError, ExperimentConfig, absolute_init, load_config
from fedgen.running.apart import plan_apart
from fedgen.running.processes import ProcessGroup, free_port, stop_on_sigterm, wait_until_healthy

if TYPE_CHECKING:  # run_dir imports torch: keep it out of `fedgen --help`
    from fedgen.run_dir import RunDir

PROJECT_ROOT = CONF_DIR.parent  # its pyproject.toml is the Flower app
CONNECTION = "fedgen-local"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SimulationError(RuntimeError):
    pass


def flower_environment(flwr_home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """Telemetry and update checks off, no runtime installs, everything Flower writes kept local."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED=os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        FLWR_DISABLE_UPDATE_CHECK=os.environ.get("FLWR_DISABLE_UPDATE_CHECK", "1"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    if ray_tmp is not None:
        env.update(
            RAY_TMPDIR=str(ray_tmp),  # short path: Ray puts unix sockets there
            RAY_DEDUP_LOGS="0",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        )
    return env


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """The `flwr` CLI's connection to a SuperLink: TLS with our CA, or plaintext when None."""
    security = f'root-certificates = "{root_certificates.resolve()}"' if root_certificates else "insecure = true"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def write_run_config(path: Path, overrides: list[str], run_dir: RunDir, mode: str = "train") -> Path:
    """The app's run config: only what selects and overrides the Hydra config, the run dir, and
    what the run does (train, or select: `fedgen select`)."""
    import tomli_w  # a dependency of flwr

    path.write_text(tomli_w.dumps({"overrides": json.dumps(overrides), "run-dir": str(run_dir.root), "mode": mode}))
    return path


def parallel_hospitals(fed, cores: int | None = None) -> int:
    """Hospitals that train at once (`parallel_clients`; 0 chooses). A small federation trains all
    at once (3 hospitals on 2 cores side by side, not in two waves that leave a core idle); a
    larger one gets one worker per core, at most 8: each worker is a process with its own torch
    (about 0.5 GiB), and more of them than cores add memory, not speed (benchmarks/scale.py)."""
    if fed.parallel_clients:
        return fed.parallel_clients
    cores = cores or os.cpu_count() or 1
    return fed.num_hospitals if fed.num_hospitals <= min(max(cores, 3), 8) else min(cores, 8)


def executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"'{name}' not found: is flwr installed in this environment?")
    return found


def plan_table(cfg: ExperimentConfig) -> list[dict]:
    """Build every silo and plan its privacy here, so an impossible setting fails before any
    Flower process starts (delta >= 1/N, an empty silo, a budget no noise can meet)."""
    from fedgen.data.silos import build_silos
    from fedgen.privacy.accounting import EpsilonLedger, make_plan
    from fedgen.privacy.dp_sgd import privacy_units, unit_count
    from fedgen.privacy.lifetime import check_simulated_site

    rows = []
    for silo in build_silos(cfg):
        fed = cfg.federation
        units = privacy_units(silo.train.patient_ids, cfg.privacy.unit) if cfg.privacy.enabled else None
        plan = make_plan(unit_count(units, len(silo.train)), cfg.training.batch_size, fed.local_epochs, fed.num_rounds)
        row = {
            "hospital": silo.hospital,
            "train": len(silo.train),
            "per": "per patient" if units is not None else "",
            "heldout": len(silo.heldout),
            "validation": len(silo.validation),
            "q": plan.sample_rate,
            "steps": plan.total_steps,
        }
        sigma = EpsilonLedger.start(cfg.privacy, plan).noise_multiplier if cfg.privacy.enabled else 0.0
        if cfg.privacy.enabled:
            row["sigma"] = sigma
        # A run that would pass a hospital's lifetime budget is refused here; the hospital checks too.
        check_simulated_site(cfg, silo, plan.sample_rate, plan.total_steps, sigma)
        rows.append(row)
    return rows


def start_line(cfg: ExperimentConfig) -> str:
    """Where round 0 comes from and what the hospitals train; refuses a base that does not fit."""
    from fedgen.base_model import base_path, initial_unet
    from fedgen.trainable import prepare_training, uses_lora

    unet = initial_unet(cfg, cfg.runs_dir)
    total = sum(p.numel() for p in unet.parameters())  # before any adapter is added
    trained = prepare_training(unet, cfg.training)
    path = base_path(cfg, cfg.runs_dir)
    start = f"from {path}" if path else "from random weights (seed)"
    what = "all" if trained == total else f"{trained:,} ({cfg.training.trainable})"
    ema = f", EMA {cfg.training.ema_decay:g}" if cfg.training.ema_decay else ""
    line = f"  model: starts {start}; hospitals train {what} of its {total:,} parameters{ema}"
    if uses_lora(cfg.training):
        t = cfg.training
        line += (f"\n  LoRA: rank {t.lora_rank}, alpha {t.lora_alpha:g} on {', '.join(t.lora_targets)}; "
                 "merged into the weights before each update is sent")
    return line


def prepare_run_dir(run_dir: RunDir, cfg: ExperimentConfig, overrides: list[str], argv: list[str]) -> bool:
    """Create the run directory, or check that an existing one belongs to the same config.
    Returns True when the run is already complete."""
    resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if run_dir.config.exists():
        if run_dir.config.read_text() != resolved:
            raise ConfigError(
                f"name: run directory {run_dir.root} holds a run with a different config; "
                f"resume it with the same overrides ({run_dir.overrides.read_text().strip()}) "
                "or pick a new name=..."
            )
        return run_dir.is_complete()
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.config.write_text(resolved)
    run_dir.overrides.write_text(json.dumps(overrides))
    run_dir.command.write_text(" ".join(argv) + "\n")
    return False


def simulate(overrides: list[str], argv: list[str] | None = None, echo=print) -> RunDir:
    from fedgen.run_dir import RunDir

    stop_on_sigterm()
    overrides = absolute_init(overrides)
    cfg = load_config(overrides)
    run_dir = RunDir(Path(cfg.runs_dir) / cfg.name)
    echo(f"fedgen: {cfg.federation.num_hospitals} hospitals, {cfg.federation.num_rounds} rounds, "
         f"privacy {'epsilon ' + format(cfg.privacy.target_epsilon, 'g') if cfg.privacy.enabled else 'off'}, "
         f"model {cfg.model.name}, data {cfg.data.source}")
    # The planning needs torch, diffusers and Opacus: a child process does it, so that this one
    # waits on Flower without them (fedgen.running.apart).
    prepared = plan_apart(prepare_simulation, overrides, argv or sys.argv, echo=echo)
    if prepared["complete"]:
        return run_dir
    run_flower(cfg, overrides, run_dir, echo, gpus=prepared["gpus"])
    return run_dir


def prepare_simulation(overrides: list[str], argv: list[str], echo=print) -> dict:
    """Everything before Flower starts: plan and show each hospital's privacy (an impossible
    setting fails here), pretrain the base if needed, prepare or resume the run directory.
    Returns {"complete": the run had already finished, "gpus": each simulated hospital's GPUs}."""
    cfg = load_config(overrides)
    from fedgen.run_dir import RunDir
    from fedgen.running.pretrain import ensure_base

    run_dir = RunDir(Path(cfg.runs_dir) / cfg.name)
    rows = plan_table(cfg)  # impossible privacy or data settings fail here, before any training
    level = cfg.privacy.hospital_level
    if level.enabled:  # the coordinator's own DP: a budget no noise can meet fails here too
        from fedgen.privacy.hospital_level import hospital_level_sigma

        level_line = (f"  hospital level, at the coordinator: epsilon {level.target_epsilon:g}, delta {level.delta:g}, "
                      f"q_h {level.sample_rate:g}, clipping {level.clipping_norm:g}, "
                      f"sigma {hospital_level_sigma(cfg):.3f} over {cfg.federation.num_rounds} rounds")
    ensure_base(cfg, cfg.runs_dir, echo)  # trains fedgen's public base once, if the run starts from it
    echo(start_line(cfg))
    for row in rows:
        sigma = f", sigma {row['sigma']:.3f}" if "sigma" in row else ""
        echo(f"  hospital {row['hospital']}: {row['train']} training images "
             f"({row['heldout']} held out, {row['validation']} validation), q {row['q']:.3f}{' ' + row['per'] if row['per'] else ''}, "
             f"{row['steps']} planned steps{sigma}")
    if level.enabled:
        echo(level_line)
    gpus = client_gpus(cfg)
    if prepare_run_dir(run_dir, cfg, overrides, argv):
        echo(f"run '{cfg.name}' is already complete: {run_dir.root}")
        return {"complete": True, "gpus": gpus}
    checkpoint = run_dir.latest_checkpoint()
    if checkpoint:
        echo(f"resuming '{cfg.name}' after round {checkpoint['round']}")
    return {"complete": False, "gpus": gpus}


def client_gpus(cfg: ExperimentConfig) -> float:
    """GPUs per simulated hospital: `federation.client_gpus`, or (-1) one where CUDA is present."""
    if cfg.federation.client_gpus >= 0:
        return cfg.federation.client_gpus
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def run_flower(cfg: ExperimentConfig, overrides: list[str], run_dir: RunDir, echo=print, mode: str = "train",
               gpus: float | None = None) -> None:
    """Run the app in Flower's simulation; `gpus` per hospital (None: `client_gpus(cfg)`)."""
    work = Path(tempfile.mkdtemp(prefix="fedgen-"))
    flwr_home, ray_tmp = work / "home", work / "ray"
    flwr_home.mkdir()
    ray_tmp.mkdir()
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", root_certificates=None)
    run_config = write_run_config(work / "run-config.toml", overrides, run_dir, mode)
    fed = cfg.federation
    gpus = client_gpus(cfg) if gpus is None else gpus
    federation_config = (
        f"num_supernodes={fed.num_hospitals} client_resources_num_cpus={fed.client_cpus} "
        f"client_resources_num_gpus={gpus}"
    )
    if not gpus and not os.environ.get("RAY_ADDRESS"):  # a Ray cluster counts its own CPUs
        # The CPUs Ray may hand out cap the workers: `parallel_hospitals` workers' worth. Each runs
        # one torch thread per CPU it reserves, so 3 on 2 cores costs little.
        federation_config += f" init_args_num_cpus={parallel_hospitals(fed) * fed.client_cpus}"
    log = run_dir.flower_log
    processes = ProcessGroup(flower_environment(flwr_home, ray_tmp))
    status, details = "unknown", ""
    grace = 5.0
    try:
        superlink = processes.start(
            [executable("flower-superlink"), "--simulation", "--insecure",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(port), "--database", str(work / "state.db")],
            log_path=log,
        )
        wait_until_healthy(f"http://127.0.0.1:{port}/health", superlink)
        command = [executable("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream",
                   "--federation-config", federation_config, "--run-config", str(run_config)]
        run_id = stream(command, processes, log, echo)
        if run_id is None:
            raise SimulationError(f"Flower did not start the run; see {log}")
        status, details = run_status(run_id, processes.env)
    except KeyboardInterrupt:
        echo(f"\ninterrupted: stopping Flower. Run the same command again to resume from {run_dir.root}")
        grace = 0.0  # stop now: Flower's simulation ignores SIGTERM and would finish the run
        raise
    finally:
        processes.stop(grace=grace)
        shutil.rmtree(work, ignore_errors=True)
    ended = run_dir.read_metrics()
    if ended.get("status") in ("refused", "failed", "incomplete"):
        lost = "".join(f"\n  lost: {line}" for line in ended.get("summary", {}).get("lost", []))
        why = ended.get("error") or f"round(s) {ended['summary']['rounds_model_unchanged']} had too few usable updates"
        raise SimulationError(f"the run ended '{ended['status']}': {why}{lost}\nfull log: {log}")
    if status != "finished:completed":
        raise SimulationError(f"the federation ended as '{status}': {details}\nfull log: {log}")
    echo(f"\nresults: {run_dir.root}")
    if mode == "select":
        echo(f"  release (the base and its cells' weights): {run_dir.root / 'selection.pt'}")
        echo(f"  samples: {run_dir.root / 'selection.png'} (the base's: {run_dir.root / 'selection_base.png'})")
    else:
        echo(f"  global model (diffusers pipeline): {run_dir.pipeline}")
    echo(f"  metrics: {run_dir.metrics}")
    echo(f"  watch it: tensorboard --logdir {run_dir.root.parent}")


def stream(command: list[str], processes: ProcessGroup, log: Path, echo, started: list[int] | None = None) -> int | None:
    """Run `flwr run --stream`, keep everything in the log, show fedgen's own lines.
    The run id is appended to `started` as soon as Flower prints it."""
    proc = subprocess.Popen(
        command, env=processes.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    processes.processes.append(proc)
    run_id = None
    with open(log, "a") as out:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.write(line)
            clean = ANSI.sub("", line).rstrip()
            if "[fedgen]" in clean:
                echo(clean.split("[fedgen] ", 1)[-1])
            elif match := re.search(r"Successfully started run (\d+)", clean):
                run_id = int(match.group(1))
                if started is not None:
                    started.append(run_id)
            elif clean.startswith(("Error", "❌")):  # tracebacks stay in the log
                echo(clean)
    proc.wait()
    return run_id


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> tuple[str, str]:
    """`flwr run --stream` exits 0 even when the run failed: ask the SuperLink how it ended."""
    listing = subprocess.run(
        [executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    try:
        info = json.loads(listing.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "unknown", listing.stdout + listing.stderr
    return str(info.get("status")), str(info.get("status-details", ""))
