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
import sys
from pathlib import Path

from fedgen.config import ConfigError, load_config
from fedgen.running.deploy import (
    CONNECTION,
    ISOLATIONS,
    DeploymentError,
    cli_environment,
    deploy_run,
    executor_command,
    node_config,
    register,
    shown,
    start_supernode,
    superlink_command,
    supernode_command,
)
from fedgen.running.preflight import check_count, check_writable
from fedgen.running.processes import ProcessGroup, stop_on_sigterm
from fedgen.running.simulate import executable, flower_environment

DEFAULT_PORT = 9092
INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Anyone who can reach the "
    "SuperLink can read the model updates, join as a hospital or submit code to run at the "
    "hospitals. Use it only for a test on one machine."
)


def _security(args: argparse.Namespace) -> Path | None:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None
    if not args.ca:
        raise DeploymentError("--ca: the federation's CA certificate (ca.crt) is needed for TLS "
                              "(or pass --insecure for a local test)")
    return Path(args.ca)


def _check_port(port: int, flag: str) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag}: a TCP port is 1..65535, got {port}")


def _check_exists(paths: list[str], flag: str) -> None:
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"{flag}: {path}: no such file or directory")


def _foreground(command: list[str], env: dict[str, str], print_only: bool) -> int:
    print(shown(command, env), flush=True)
    if print_only:
        return 0
    with ProcessGroup(env) as processes:
        return processes.start(command, show_output=True).wait()


def _certs(args: argparse.Namespace) -> int:
    from fedgen.running.certificates import make_certificates

    check_count(args.nodes, "--nodes", 1)
    check_writable(args.dir, "dir")
    files = make_certificates(args.dir, args.nodes, args.hosts)
    print(f"wrote a CA, a SuperLink certificate for {', '.join(args.hosts or [])}{', ' if args.hosts else ''}"
          f"127.0.0.1, localhost and {args.nodes} SuperNode key pairs to {files.root}")
    print(f"  coordinator keeps: {files.ca_key.name} (offline), {files.server_cert.name}, {files.server_key.name}")
    print(f"  hospital N gets:   {files.ca.name} and node-N (its private key); register node-N.pub")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    state = Path(args.state).resolve()
    certs = None if args.insecure else Path(args.certs)
    _check_port(args.port, "--port")
    if not args.print_only:
        check_writable(state, "--state")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    command = superlink_command(certs, args.host, args.port, state / "state.db")
    if not args.print_only:
        state.mkdir(parents=True, exist_ok=True)
    return _foreground(command, flower_environment(state / "flower"), args.print_only)


def _register(args: argparse.Namespace) -> int:
    _check_exists(args.public_keys, "public_keys")
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
    check_count(args.num_partitions, "--num-partitions", 1)
    if not 0 <= args.partition_id < args.num_partitions:
        raise ConfigError(f"--partition-id: must be in [0, {args.num_partitions - 1}] (--num-partitions "
                          f"{args.num_partitions}), got {args.partition_id}")
    _check_port(args.port, "--port")
    _check_exists([p for p in (args.data_path, args.data_csv) if p], "--data-path/--data-csv")
    ca = _security(args)
    data_dir = Path(args.data_dir).resolve()
    if not args.print_only:
        check_writable(data_dir, "--data-dir")
    # Only a local test node (--insecure) lets a run derive its DP noise from the config.
    config = node_config(args.partition_id, args.num_partitions, data_dir, args.data_path, args.data_csv,
                         allow_reproducible_noise=args.insecure, lifetime_budget=args.lifetime_budget)
    command = supernode_command(args.superlink, ca, Path(args.key) if args.key else None, config, args.port,
                               args.isolation)
    env = flower_environment(data_dir / "flower")
    if args.isolation == "subprocess":
        return _foreground(command, env, args.print_only)
    print(shown(command, env), flush=True)
    print(shown(executor_command(args.port, "SUPERNODE_PID"), env), flush=True)
    if args.print_only:
        return 0
    data_dir.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(env) as processes:  # the SuperNode and its ClientApp executor stop together
        return start_supernode(processes, command, args.port, args.isolation, show_output=True).wait()


def _say(text: str) -> None:
    print(text, flush=True)  # line by line also when the output goes to a file (a service's log)


def _run(args: argparse.Namespace) -> int:
    check_count(args.min_nodes, "--min-nodes", 1)
    if not args.node_timeout > 0:
        raise ConfigError(f"--node-timeout: must be > 0 seconds, got {args.node_timeout}")
    check_writable(load_config(args.overrides).runs_dir, "runs_dir")
    deploy_run(args.overrides, args.superlink, _security(args), args.min_nodes, args.node_timeout,
               args.print_only, echo=_say, select=args.select)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedgen.running.loopback import run_demo  # loopback builds on deploy, not on these commands

    check_count(args.nodes, "--nodes", 1)
    if args.workdir:
        check_writable(args.workdir, "--workdir")
    run_demo(args.overrides, num_nodes=args.nodes, workdir=args.workdir, namespaces=args.netns,
             isolation=args.isolation, select=args.select)
    return 0


def _errors(handler):
    def run(args: argparse.Namespace) -> int:
        stop_on_sigterm()  # a killed `fedgen deploy ...` stops the Flower processes it started
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

    def isolation(p):
        p.add_argument("--isolation", choices=ISOLATIONS, default="process",
                       help="process (default): one warm ClientApp process beside each SuperNode serves every "
                       "message (clients/executor.py); subprocess: Flower's own, a fresh flwr-clientapp per message")

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
    isolation(p)
    p.add_argument("--lifetime-budget", type=float, help="the most epsilon this site spends on its patients "
                   "over all runs (its ledger: <data-dir>/fedgen/lifetime.json); a run's own can only be tighter")
    p.set_defaults(run=_errors(_supernode))

    p = sub.add_parser("run", help="submit the federation to the SuperLink and follow it (resumes)")
    connection(p)
    p.add_argument("--min-nodes", type=int, help="start once this many SuperNodes are online "
                   "(default: federation.num_hospitals)")
    p.add_argument("--node-timeout", type=float, default=600.0, help="seconds to wait for them")
    p.add_argument("--select", action="store_true", help="private selection instead of training: one round "
                   "of the hospitals' noisy votes over the public base's samples (as fedgen select)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedgen simulate")
    p.set_defaults(run=_errors(_run))

    p = sub.add_parser("demo", help="a whole TLS federation on this machine: SuperLink, N SuperNodes, one run")
    p.add_argument("--nodes", type=int, default=3)
    isolation(p)
    p.add_argument("--workdir", help="where certificates, logs and hospital data go (default: a temp dir)")
    p.add_argument("--netns", action="store_true", help="each hospital in its own network namespace (root)")
    p.add_argument("--select", action="store_true", help="private selection instead of training: one round "
                   "of the hospitals' noisy votes over the public base's samples (as fedgen select)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedgen simulate")
    p.set_defaults(run=_errors(_demo))
