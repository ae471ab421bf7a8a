"""Flower's deployment engine, driven from Python: the flower-superlink and flower-supernode
commands (TLS and SuperNode authentication unless `certs`/`ca` is None, the insecure mode), a
SuperNode's node config, the `flwr` CLI's connection, node registration and status, and
`deploy_run`, which submits a federation to a running SuperLink and follows it.

The `fedgen deploy` commands (`deploy_commands`) and the one-machine federation (`loopback`) are
built on it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fedgen.running.processes import ProcessGroup
from fedgen.running.simulate import (
    PROJECT_ROOT,
    executable,
    flower_environment,
    prepare_run_dir,
    run_status,
    stream,
    write_connection,
    write_run_config,
)

CONNECTION = "fedgen-deploy"


class DeploymentError(RuntimeError):
    pass


def shown(command: list[str], env: dict[str, str] | None = None) -> str:
    """The command as a person would type it, with the Flower variables it needs in front."""
    keys = ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")
    prefix = [f"{k}={shlex.quote(env[k])}" for k in keys if env and k in env]
    return " ".join([*prefix, shlex.join(str(c) for c in command)])


# --- the Flower commands ------------------------------------------------------------------------
def superlink_command(certs: Path | None, host: str, port: int, database: Path) -> list[str]:
    """flower-superlink with TLS (all its APIs share one port) and SuperNode authentication;
    `certs=None` is the insecure mode."""
    from fedgen.running.certificates import CertificateFiles

    command = [executable("flower-superlink")]
    if certs is None:
        command += ["--insecure"]
    else:
        files = CertificateFiles(Path(certs).resolve())
        for path in (files.ca, files.server_cert, files.server_key):
            if not path.exists():
                raise DeploymentError(f"{path} is missing: create it with `fedgen deploy certs {certs}`")
        command += ["--ssl-ca-certfile", str(files.ca), "--ssl-certfile", str(files.server_cert),
                    "--ssl-keyfile", str(files.server_key), "--enable-supernode-auth"]
    return command + ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port),
                      "--database", str(database)]


def _toml_string(value: str | Path) -> str:
    # Flower splits --node-config on spaces outside quotes and reads each value as TOML.
    text = str(value)
    if '"' in text or "\\" in text:
        raise DeploymentError(f"a path with a double quote or backslash cannot go into the node config: {text}")
    return f'"{text}"'


def node_config(partition: int, num_partitions: int, data_dir: Path, data_path: str | None = None,
                data_csv: str | None = None, allow_reproducible_noise: bool = False,
                lifetime_budget: float | None = None) -> str:
    """The SuperNode's node config: which hospital it is and where its data lives
    (`fedgen.federation.site`)."""
    items = [f"partition-id={partition}", f"num-partitions={num_partitions}",
             f"data-dir={_toml_string(Path(data_dir).resolve())}"]
    if allow_reproducible_noise:
        items.append("allow-reproducible-noise=true")
    if lifetime_budget is not None:
        if not (0 < lifetime_budget < float("inf")):
            raise DeploymentError(f"--lifetime-budget: must be a positive finite epsilon, got {lifetime_budget}")
        items.append(f"lifetime-budget={float(lifetime_budget)!r}")
    if data_path:
        items.append(f"data-path={_toml_string(Path(data_path).resolve())}")
    if data_csv:
        items.append(f"data-csv={_toml_string(Path(data_csv).resolve())}")
    return " ".join(items)


# How a SuperNode runs its ClientApp. "process": fedgen's warm executor (`clients.executor`), one
# long-lived process beside the SuperNode that runs message after message. "subprocess": Flower's
# own, a fresh flwr-clientapp process per message (imports, FAB install and silo every time).
ISOLATIONS = ("process", "subprocess")


def supernode_command(superlink: str, ca: Path | None, key: Path | None, config: str, port: int,
                      isolation: str = "process") -> list[str]:
    """flower-supernode dialling `superlink` over TLS, authenticated with its private key;
    `ca=None` is the insecure mode. `port` is the node's own local Runtime API port, where the
    ClientApp executor (`executor_command`, with `isolation="process"`) takes its tasks."""
    if isolation not in ISOLATIONS:
        raise DeploymentError(f"--isolation: one of {', '.join(ISOLATIONS)}, got '{isolation}'")
    # Flower's flower-supernode, polling for messages every 0.2 s rather than 3 s (`clients/prompt_supernode.py`).
    command = [sys.executable, "-m", "clients.prompt_supernode", "--superlink", superlink]
    if ca is None:
        command += ["--insecure"]
    else:
        if key is None:
            raise DeploymentError("--key: a SuperNode needs its private key (node authentication)")
        for path in (ca, key):
            if not Path(path).exists():
                raise DeploymentError(f"{path} is missing")
        command += ["--root-certificates", str(Path(ca).resolve()),
                    "--auth-supernode-private-key", str(Path(key).resolve())]
    return command + ["--node-config", config, "--port", str(port), "--isolation", isolation]


def executor_command(port: int, supernode_pid: int | str) -> list[str]:
    """fedgen's warm ClientApp executor for the SuperNode whose Runtime API is on `port` (on the
    same machine); it exits with the SuperNode. It imports torch and diffusers while the node
    starts, not in the first round."""
    return [sys.executable, "-m", "clients.executor", "--runtime-api-address", f"127.0.0.1:{port}",
            "--parent-pid", str(supernode_pid), "--preload", "torch", "diffusers", "opacus"]


def start_supernode(group: ProcessGroup, command: list[str], port: int, isolation: str,
                    log_path: Path | None = None, executor_log: Path | None = None,
                    prefix: list[str] | None = None, show_output: bool = False) -> subprocess.Popen:
    """Start a SuperNode (`supernode_command`) in `group`, and beside it its ClientApp executor
    when `isolation` is "process"; `prefix` runs both in a network namespace."""
    prefix = prefix or []
    proc = group.start([*prefix, *command], log_path=log_path, show_output=show_output)
    if isolation == "process":
        group.start([*prefix, *executor_command(port, proc.pid)], log_path=executor_log, show_output=show_output)
    return proc


def cli_environment(flwr_home: Path, superlink: str, ca: Path | None) -> dict[str, str]:
    """Environment for the `flwr` CLI with one connection, named CONNECTION, to the SuperLink."""
    write_connection(flwr_home, CONNECTION, superlink, ca)
    return flower_environment(flwr_home)


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 60) -> dict:
    done = subprocess.run([executable("flwr"), *args, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"success": False, "error-message": (done.stdout + done.stderr).strip()[-2000:]}


def node_status(env: dict[str, str]) -> dict[str, str]:
    """{node id: 'registered' | 'online' | 'offline' ...} as the SuperLink sees its SuperNodes."""
    listing = flwr_json(["supernode", "ls", CONNECTION], env)
    if not listing.get("success", False):
        raise DeploymentError(f"cannot list the SuperNodes: {listing.get('error-message', listing)}")
    return {str(n["node-id"]): str(n.get("status")) for n in listing.get("nodes", [])}


def online_nodes(env: dict[str, str]) -> list[str]:
    return [node for node, status in node_status(env).items() if status == "online"]


def wait_for_nodes(env: dict[str, str], wanted: int, timeout: float, echo=print) -> None:
    """Block until `wanted` SuperNodes are online: Flower samples each round from whoever is
    connected, so a federation started early would train round 1 without the late hospitals."""
    deadline, last, online, problem = time.time() + timeout, "", [], ""
    while True:
        try:
            online, problem = online_nodes(env), ""
        except DeploymentError as err:  # the SuperLink may still be starting
            problem = str(err)
        if len(online) >= wanted:
            return
        news = problem or f"waiting for hospitals: {len(online)}/{wanted} SuperNodes online"
        if news != last:
            echo(news)
            last = news
        if time.time() > deadline:
            raise DeploymentError(f"only {len(online)} of {wanted} SuperNodes came online within "
                                  f"{timeout:.0f} s (see `flwr supernode ls`); lower --min-nodes to start "
                                  f"anyway. {problem}")
        time.sleep(2)


# --- coordinator ---------------------------------------------------------------------------------
def deploy_run(overrides: list[str], superlink: str, ca: Path | None, min_nodes: int | None = None,
               node_timeout: float = 600.0, print_only: bool = False, echo=print, select: bool = False) -> Path:
    """Submit the federation (the same Hydra config as `fedgen simulate`) to a running SuperLink,
    stream its progress and check how it ended. Run it on the coordinator's machine: the ServerApp
    writes the run directory (checkpoints, metrics, release) there. Run it again to resume.
    `select`: private selection (`fedgen select`) instead of training: one round of noisy votes."""
    from fedgen.config import absolute_init, load_config
    from fedgen.run_dir import RunDir
    from fedgen.running.pretrain import ensure_base
    from fedgen.running.select import check_selection_run_dir, selection_overrides

    overrides = selection_overrides(overrides) if select else absolute_init(overrides)
    cfg = load_config(overrides)
    if cfg.privacy.enabled and cfg.privacy.reproducible_noise and ca is not None:
        raise DeploymentError(
            "privacy.reproducible_noise=true derives every hospital's DP noise and sampling from the "
            "config, which the coordinator holds: no privacy guarantee. It is for local tests only "
            "(add --insecure); hospitals' SuperNodes refuse it unless started with --insecure too."
        )
    run_dir = RunDir(Path(cfg.runs_dir) / cfg.name)
    flwr_home = run_dir.root / "flower"
    env = cli_environment(flwr_home, superlink, ca)
    run_config = write_run_config(flwr_home / "run-config.toml", overrides, run_dir, "select" if select else "train")
    command = [executable("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream", "--run-config", str(run_config)]
    echo(shown(command, env))
    if print_only:
        return run_dir.root
    ensure_base(cfg, cfg.runs_dir, echo)  # the coordinator holds the base; hospitals get its weights
    if select:
        check_selection_run_dir(run_dir)
    if prepare_run_dir(run_dir, cfg, overrides, ["fedgen", "deploy", "run", *(["--select"] if select else []), *overrides]):
        echo(f"run '{cfg.name}' is already complete: {run_dir.root}")
        return run_dir.root
    checkpoint = run_dir.latest_checkpoint()
    if checkpoint:
        echo(f"resuming '{cfg.name}' after round {checkpoint['round']}")
    wanted = cfg.federation.num_hospitals if min_nodes is None else min_nodes
    wait_for_nodes(env, wanted, node_timeout, echo)
    processes = ProcessGroup(env)
    started: list[int] = []
    try:
        run_id = stream(command, processes, run_dir.flower_log, echo, started)
        if run_id is None:
            raise DeploymentError(f"Flower did not start the run; see {run_dir.flower_log}")
        status, details = run_status(run_id, env, CONNECTION)
    except KeyboardInterrupt:
        # The run would go on at the SuperLink: stop it, so that running this again resumes it
        # from the last checkpoint instead of racing a second ServerApp on the same run dir.
        for run_id in started:
            subprocess.run([executable("flwr"), "stop", str(run_id), CONNECTION], env=env,
                           capture_output=True, timeout=60)
        echo(f"\ninterrupted: stopped run {started}. Run the same command again to resume from {run_dir.root}")
        raise
    finally:
        processes.stop()
    if status != "finished:completed":
        raise DeploymentError(f"the federation ended as '{status}': {details}\nfull log: {run_dir.flower_log}")
    echo(f"\nresults: {run_dir.root}")
    if select:  # the coordinator holds no held-out images to measure it with: report without them
        from fedgen.evaluation.selection_report import write_selection_report

        echo(f"  release (the base and its cells' weights): {run_dir.selection}; report: {write_selection_report(run_dir.root)}")
    else:
        echo(f"  global model (diffusers pipeline): {run_dir.pipeline}")
    echo(f"  metrics: {run_dir.metrics}")
    return run_dir.root


def register(public_keys: list[Path], superlink: str, ca: Path | None, flwr_home: Path, echo=print) -> list[str]:
    """Register SuperNode public keys at the SuperLink; returns their node ids."""
    env = cli_environment(flwr_home, superlink, ca)
    ids = []
    for key in public_keys:
        command = [executable("flwr"), "supernode", "register", str(Path(key).resolve()), CONNECTION]
        echo(shown(command, env))
        reply = flwr_json(command[1:], env)
        if not reply.get("success", False):
            raise DeploymentError(f"registering {key} failed: {reply.get('error-message', reply)}")
        ids.append(str(reply.get("node-id", "")))
    return ids
