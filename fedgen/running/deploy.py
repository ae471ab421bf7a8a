"""`fedgen deploy`: the federation across machines, with Flower's deployment engine.

    coordinator                                   each hospital (next to its data)
      fedgen deploy certs certs --nodes 3 --hosts coordinator.example.org
      fedgen deploy superlink --certs certs         fedgen deploy supernode --superlink HOST:9092
      fedgen deploy register certs/node-*.pub          --ca ca.crt --key node-0 --partition-id 0
      fedgen deploy run [Hydra overrides]              --num-partitions 3 --data-dir /srv/fedgen

Flower's own processes do the work: each command prints the exact Flower command it runs
(`--print-only` prints it and stops). TLS and SuperNode authentication are on by default;
`--insecure` turns both off, only when asked, with a warning. Runtime dependency installation is
off everywhere: machines run the fedgen they have installed.
"""

from __future__ import annotations

import argparse
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

DEFAULT_PORT = 9092
CONNECTION = "fedgen-deploy"
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can reach the "
    "SuperLink can read the model updates, join as a hospital or submit code to run at the "
    "hospitals. Use it only for a test on one machine."
)


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
                data_csv: str | None = None, allow_reproducible_noise: bool = False) -> str:
    """The SuperNode's node config: which hospital it is and where its data lives (`fedgen.federation.site`)."""
    items = [f"partition-id={partition}", f"num-partitions={num_partitions}",
             f"data-dir={_toml_string(Path(data_dir).resolve())}"]
    if allow_reproducible_noise:
        items.append("allow-reproducible-noise=true")
    if data_path:
        items.append(f"data-path={_toml_string(Path(data_path).resolve())}")
    if data_csv:
        items.append(f"data-csv={_toml_string(Path(data_csv).resolve())}")
    return " ".join(items)


def supernode_command(superlink: str, ca: Path | None, key: Path | None, config: str, port: int) -> list[str]:
    """flower-supernode dialling `superlink` over TLS, authenticated with its private key;
    `ca=None` is the insecure mode. `port` is the node's own local ClientApp port."""
    command = [executable("flower-supernode"), "--superlink", superlink]
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
    return command + ["--node-config", config, "--port", str(port)]


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
               node_timeout: float = 600.0, print_only: bool = False, echo=print) -> Path:
    """Submit the federation (the same Hydra config as `fedgen simulate`) to a running SuperLink,
    stream its progress and check how it ended. Run it on the coordinator's machine: the ServerApp
    writes the run directory (checkpoints, metrics, release) there. Run it again to resume."""
    from fedgen.config import load_config
    from fedgen.run_dir import RunDir

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
    run_config = write_run_config(flwr_home / "run-config.toml", overrides, run_dir)
    command = [executable("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--stream", "--run-config", str(run_config)]
    echo(shown(command, env))
    if print_only:
        return run_dir.root
    if prepare_run_dir(run_dir, cfg, overrides, ["fedgen", "deploy", "run", *overrides]):
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


# --- the `fedgen deploy` commands ----------------------------------------------------------------
def _security(args: argparse.Namespace) -> Path | None:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None
    if not args.ca:
        raise DeploymentError("--ca: the federation's CA certificate (ca.crt) is needed for TLS "
                              "(or pass --insecure for a local test)")
    return Path(args.ca)


def _foreground(command: list[str], env: dict[str, str], print_only: bool) -> int:
    print(shown(command, env), flush=True)
    if print_only:
        return 0
    with ProcessGroup(env) as processes:
        return processes.start(command, show_output=True).wait()


def _certs(args: argparse.Namespace) -> int:
    from fedgen.running.certificates import make_certificates

    files = make_certificates(args.dir, args.nodes, args.hosts)
    print(f"wrote a CA, a SuperLink certificate for {', '.join(args.hosts or [])}{', ' if args.hosts else ''}"
          f"127.0.0.1, localhost and {args.nodes} SuperNode key pairs to {files.root}")
    print(f"  coordinator keeps: {files.ca_key.name} (offline), {files.server_cert.name}, {files.server_key.name}")
    print(f"  hospital N gets:   {files.ca.name} and node-N (its private key); register node-N.pub")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    state = Path(args.state).resolve()
    certs = None if args.insecure else Path(args.certs)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    command = superlink_command(certs, args.host, args.port, state / "state.db")
    if not args.print_only:
        state.mkdir(parents=True, exist_ok=True)
    return _foreground(command, flower_environment(state / "flower"), args.print_only)


def _register(args: argparse.Namespace) -> int:
    ca, home = _security(args), Path(args.flwr_home).resolve()
    if args.print_only:
        env = cli_environment(home, args.superlink, ca)
        for key in args.public_keys:
            print(shown([executable("flwr"), "supernode", "register", str(Path(key).resolve()), CONNECTION], env))
        return 0
    ids = register([Path(k) for k in args.public_keys], args.superlink, ca, home)
    for key, node in zip(args.public_keys, ids):
        print(f"registered {key}: node {node}")
    print(f"list them: FLWR_HOME={home} flwr supernode ls {CONNECTION}")
    return 0


def _supernode(args: argparse.Namespace) -> int:
    ca = _security(args)
    data_dir = Path(args.data_dir).resolve()
    # Only a local test node (--insecure) lets a run derive its DP noise from the config.
    config = node_config(args.partition_id, args.num_partitions, data_dir, args.data_path, args.data_csv,
                         allow_reproducible_noise=args.insecure)
    command = supernode_command(args.superlink, ca, Path(args.key) if args.key else None, config, args.port)
    if not args.print_only:
        data_dir.mkdir(parents=True, exist_ok=True)
    return _foreground(command, flower_environment(data_dir / "flower"), args.print_only)


def _say(text: str) -> None:
    print(text, flush=True)  # line by line also when the output goes to a file (a service's log)


def _run(args: argparse.Namespace) -> int:
    deploy_run(args.overrides, args.superlink, _security(args), args.min_nodes, args.node_timeout,
               args.print_only, echo=_say)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedgen.running.loopback import run_demo

    run_demo(args.overrides, num_nodes=args.nodes, workdir=args.workdir, namespaces=args.netns)
    return 0


def _errors(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (DeploymentError, FileExistsError) as err:
            print(f"fedgen: error: {err}", file=sys.stderr)
            return 1
    return run


def add_deploy_commands(commands) -> None:
    """`fedgen deploy ...`, registered on fedgen's top-level subparsers."""
    deploy = commands.add_parser("deploy", help="run the federation across machines (Flower deployment engine)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    def connection(p, superlink=True):
        if superlink:
            p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}", help="the SuperLink's HOST:PORT")
        p.add_argument("--ca", help="the federation's CA certificate (ca.crt), to check the SuperLink")
        p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local tests only)")
        p.add_argument("--print-only", action="store_true", help="print the Flower command, do not run it")

    p = sub.add_parser("certs", help="create a CA, the SuperLink's certificate and SuperNode key pairs")
    p.add_argument("dir")
    p.add_argument("--nodes", type=int, required=True, help="how many SuperNode key pairs")
    p.add_argument("--hosts", nargs="*", default=[], help="names/IPs the SuperNodes will dial (loopback is added)")
    p.set_defaults(run=_errors(_certs))

    p = sub.add_parser("superlink", help="start flower-superlink (TLS, node authentication)")
    p.add_argument("--certs", default="certs", help="directory from `fedgen deploy certs`")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--state", default="superlink", help="directory for the SuperLink's database")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local tests only)")
    p.add_argument("--print-only", action="store_true", help="print the Flower command, do not run it")
    p.set_defaults(run=_errors(_superlink))

    p = sub.add_parser("register", help="register SuperNode public keys at the SuperLink")
    p.add_argument("public_keys", nargs="+")
    p.add_argument("--flwr-home", default="flower-cli", help="FLWR_HOME for the flwr CLI's connection")
    connection(p)
    p.set_defaults(run=_errors(_register))

    p = sub.add_parser("supernode", help="start this hospital's flower-supernode next to its data")
    connection(p)
    p.add_argument("--key", help="this SuperNode's private key (node-N from `fedgen deploy certs`)")
    p.add_argument("--partition-id", type=int, required=True, help="this hospital's index, 0..N-1")
    p.add_argument("--num-partitions", type=int, required=True, help="number of hospitals N")
    p.add_argument("--data-dir", required=True, help="this hospital's directory: ledgers and records live here")
    p.add_argument("--data-path", help="this hospital's own images (with data=folder|dicom|medmnist)")
    p.add_argument("--data-csv", help="with --data-path and data=folder: CSV file,patient_id,label")
    p.add_argument("--port", type=int, default=9094, help="the node's local ClientApp port")
    p.set_defaults(run=_errors(_supernode))

    p = sub.add_parser("run", help="submit the federation to the SuperLink and follow it (resumes)")
    connection(p)
    p.add_argument("--min-nodes", type=int, help="start once this many SuperNodes are online "
                   "(default: federation.num_hospitals)")
    p.add_argument("--node-timeout", type=float, default=600.0, help="seconds to wait for them")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedgen simulate")
    p.set_defaults(run=_errors(_run))

    p = sub.add_parser("demo", help="a whole TLS federation on this machine: SuperLink, N SuperNodes, one run")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--workdir", help="where certificates, logs and hospital data go (default: a temp dir)")
    p.add_argument("--netns", action="store_true", help="each hospital in its own network namespace (root)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedgen simulate")
    p.set_defaults(run=_errors(_demo))
