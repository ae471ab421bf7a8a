"""A real federation on one machine: one flower-superlink and N flower-supernode processes over
TLS with SuperNode authentication, each SuperNode with its own data directory, and optionally each
hospital in its own network namespace (its own IP address, as on separate machines).

`fedgen deploy demo` runs one federation this way; tests/test_deployment.py drives it step by step
(kill a SuperNode mid-round, restart it). Every process started is stopped by `close()`, and the
namespaces are removed, also on failure.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedgen.running.certificates import CertificateFiles, make_certificates
from fedgen.running.deploy import (
    DeploymentError,
    cli_environment,
    deploy_run,
    node_config,
    node_status,
    online_nodes,
    register,
    start_supernode,
    superlink_command,
    supernode_command,
    wait_for_nodes,
)
from fedgen.running.processes import (
    TAG_VARIABLE,
    ProcessGroup,
    alive,
    free_port,
    tagged,
    wait_until_healthy,
)
from fedgen.running.simulate import flower_environment


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Namespaces:
    """A bridge with the SuperLink's address on the host, and one namespace per hospital on it."""

    def __init__(self, count: int):
        tag = f"{random.randrange(16**4):04x}"
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        third = next(n for n in random.sample(range(100, 250), 150) if f"10.213.{n}." not in used)
        self.net = ipaddress.ip_network(f"10.213.{third}.0/24")
        self.bridge = f"fgbr{tag}"
        self.names = [f"fedgen-{tag}-h{i}" for i in range(count)]
        self.host = str(self.net[1])
        self.created: list[tuple[str, ...]] = []  # undo steps, in reverse order

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not."""
        if shutil.which("ip") is None:
            return "the `ip` command is missing"
        probe = f"fedgen-probe-{random.randrange(16**6):06x}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()} (needs root / CAP_SYS_ADMIN)"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def open(self) -> Namespaces:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.created.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            outside, inside = f"{self.bridge}v{i}", f"{self.bridge}h{i}"  # unique names: made in the root namespace
            _ip("netns", "add", name)
            self.created.append(("netns", "del", name))
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.created.append(("link", "del", outside))
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", name)
            _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", inside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", name, "link", "set", "lo", "up")  # the SuperNode's own local APIs

    def address(self, hospital: int) -> str:
        return str(self.net[hospital + 2])

    def prefix(self, hospital: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[hospital]]

    def close(self) -> None:
        for step in reversed(self.created):
            subprocess.run(["ip", *step], capture_output=True)
        self.created.clear()


class LoopbackFederation:
    """Certificates, a SuperLink, registered node keys and SuperNodes, all under `workdir`.

    `isolation`: how each SuperNode runs its ClientApp (`fedgen.running.deploy.ISOLATIONS`).
    The hospitals share this machine's cores: each gets `threads` torch threads (default: its
    share of the cores, at least 1), as each simulated hospital gets `federation.client_cpus`."""

    def __init__(self, workdir: str | Path, num_nodes: int, namespaces: bool = False, isolation: str = "process",
                 threads: int | None = None):
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.isolation = isolation
        self.threads = threads or max(1, (os.cpu_count() or 1) // num_nodes)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.netns = Namespaces(num_nodes).open() if namespaces else None
        self.host = self.netns.host if self.netns else "127.0.0.1"
        self.port = free_port()
        self.address = f"{self.host}:{self.port}"
        self.certs = CertificateFiles(self.workdir / "certs")
        try:
            if not self.certs.ca.exists():
                make_certificates(self.certs.root, num_nodes, hosts=[self.host])
            self.env = cli_environment(self.workdir / "cli", self.address, self.certs.ca)
        except BaseException:
            if self.netns:
                self.netns.close()
            raise
        self.superlink: ProcessGroup | None = None
        self.nodes: dict[int, ProcessGroup] = {}
        self.groups: list[ProcessGroup] = []  # every group ever started, to check none is left
        self.node_ids: list[str] = []  # Flower's id of hospital i's SuperNode, once registered

    def data_dir(self, hospital: int) -> Path:
        return self.workdir / f"hospital-{hospital}"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _group(self, env: dict[str, str]) -> ProcessGroup:
        # A tag of its own for each process (not one inherited from our caller), so that crashing
        # one SuperNode leaves the others running.
        group = ProcessGroup({k: v for k, v in env.items() if k != TAG_VARIABLE})
        self.groups.append(group)
        return group

    def submit(self, overrides: list[str], log_name: str) -> subprocess.Popen:
        """`fedgen deploy run` in the background, its output in logs/<log_name>.log."""
        group = self._group(dict(os.environ))
        command = [str(Path(sys.executable).parent / "fedgen"), "deploy", "run", "--superlink", self.address,
                   "--ca", str(self.certs.ca), *overrides]
        return group.start(command, log_path=self.log(log_name))

    def start_superlink(self) -> None:
        """Start the SuperLink (again, after a crash: same port, same database)."""
        state = self.workdir / "superlink"
        state.mkdir(exist_ok=True)
        self.superlink = self._group(flower_environment(state / "flower"))
        command = superlink_command(self.certs.root, self.host, self.port, state / "state.db")
        proc = self.superlink.start(command, log_path=self.log("superlink"))
        wait_until_healthy(f"https://{self.address}/health", proc, timeout=120, cafile=self.certs.ca)

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink and everything under it (the ServerApp), as a coordinator crash."""
        assert self.superlink is not None
        self.superlink.stop(crash=True)
        self.superlink = None

    def register_nodes(self) -> None:
        keys = [self.certs.node_public_key(i) for i in range(self.num_nodes)]
        self.node_ids = register(keys, self.address, self.certs.ca, self.workdir / "cli", echo=lambda _: None)

    def supernode(self, hospital: int, key: Path | None = None, tls: str = "ca", max_retries: int | None = None,
                  name: str | None = None):
        """Start hospital `hospital`'s SuperNode with its own key and data dir. For the refusal
        tests: another `key`, `tls="system"` (TLS without the federation's CA) or `tls="none"`."""
        data_dir = self.data_dir(hospital)
        data_dir.mkdir(exist_ok=True)
        port = 9094 if self.netns else free_port()  # in its own namespace each node has port 9094
        command = supernode_command(
            self.address, None if tls == "none" else self.certs.ca, key or self.certs.node_key(hospital),
            node_config(hospital, self.num_nodes, data_dir), port, self.isolation,
        )
        if tls == "system":
            at = command.index("--root-certificates")
            del command[at : at + 2]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        env = flower_environment(data_dir / "flower")
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        group = self._group(env)
        name = name or f"supernode-{hospital}"
        proc = start_supernode(group, command, port, self.isolation, log_path=self.log(name),
                               executor_log=self.log(f"{name}-clientapp"),
                               prefix=self.netns.prefix(hospital) if self.netns else None)
        return group, proc

    def start_node(self, hospital: int) -> None:
        if hospital in self.nodes:
            raise RuntimeError(f"SuperNode {hospital} is already running")
        self.nodes[hospital], _ = self.supernode(hospital)

    def crash_node(self, hospital: int) -> None:
        """SIGKILL the SuperNode and the ClientApp it runs, as a power cut would."""
        self.nodes.pop(hospital).stop(crash=True)

    def online(self) -> list[str]:
        return online_nodes(self.env)

    def status(self, hospital: int) -> str:
        try:
            return node_status(self.env).get(self.node_ids[hospital], "unknown")
        except DeploymentError:
            return "unknown"

    def wait_online(self, count: int, timeout: float = 180) -> None:
        wait_for_nodes(self.env, count, timeout, echo=lambda _: None)

    def start(self) -> LoopbackFederation:
        self.start_superlink()
        self.register_nodes()
        for hospital in range(self.num_nodes):
            self.start_node(hospital)
        self.wait_online(self.num_nodes)
        return self

    def tails(self, lines: int = 25) -> str:
        """The end of every process's log, for a failure message."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    def close(self) -> None:
        for group in reversed(self.groups):  # coordinators, SuperNodes, then the SuperLink
            group.stop()
        self.nodes.clear()
        self.superlink = None
        if self.netns:
            self.netns.close()

    def leftovers(self) -> list[int]:
        """Processes this federation started that are still alive (after `close()`: none)."""
        return [pid for group in self.groups for pid in tagged(group.tag) if alive(pid)]

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_demo(overrides: list[str], num_nodes: int | None = None, workdir: str | None = None,
             namespaces: bool = False, isolation: str = "process", echo=print, select: bool = False) -> Path:
    """`fedgen deploy demo`: start a TLS federation here, run the config once, stop everything."""
    from fedgen.config import load_config

    if num_nodes is not None and not any(o.startswith("federation.num_hospitals=") for o in overrides):
        overrides = [*overrides, f"federation.num_hospitals={num_nodes}"]
    nodes = load_config(overrides).federation.num_hospitals
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedgen-demo-"))
    with LoopbackFederation(root, nodes, namespaces=namespaces, isolation=isolation) as federation:
        echo(f"SuperLink https://{federation.address} (TLS, node authentication); "
             f"{nodes} SuperNodes ({isolation} isolation); logs in {federation.logs}")
        try:
            started = time.perf_counter()
            federation.start()
            ready = time.perf_counter()
            result = deploy_run(overrides, federation.address, federation.certs.ca, echo=echo, select=select)
        except BaseException:
            echo(federation.tails())
            raise
    echo(f"hospital ledgers: {', '.join(str(federation.data_dir(h) / 'fedgen') for h in range(nodes))}")
    echo(f"wall time: {ready - started:.1f} s to start the SuperLink and SuperNodes, "
         f"{time.perf_counter() - ready:.1f} s for `fedgen deploy run`")
    return result
