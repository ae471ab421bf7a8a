"""`fedgen deploy` without a federation: certificates, the exact Flower commands, the node
config a hospital's SuperNode passes, where a deployed hospital keeps its ledger, the
ServerApp's prompt Grid, and that a killed command stops the one SuperLink it started."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from PIL import Image

from fedgen.cli import main as cli_main
from fedgen.config import ConfigError, load_config
from fedgen.federation.hospital import silos_for
from fedgen.federation.site import site_home, site_silo
from fedgen.running.certificates import make_certificates
from fedgen.running.deploy import (
    DeploymentError,
    executor_command,
    node_config,
    superlink_command,
    supernode_command,
)
from fedgen.running.processes import TAG_VARIABLE, alive, free_port, tagged
from server.grid import FIRST_RETRY, PromptGrid, prompt_object_pulls

TINY = ["data.num_patients=48", "data.image_size=16", "federation.num_hospitals=3", "name=pilot"]


def test_certificates_chain_names_and_node_keys(tmp_path):
    files = make_certificates(tmp_path / "certs", 2, hosts=["coordinator.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for node in (0, 1):
        # What flower-supernode loads (OpenSSH EC private key) and `flwr supernode register` reads.
        key = load_ssh_private_key(files.node_key(node).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = files.node_public_key(node).read_bytes()
        assert public.startswith(b"ecdsa-sha2-nistp384 ")
        assert load_ssh_public_key(public).public_numbers() == key.public_key().public_numbers()
        assert files.node_key(node).stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path / "certs", 1)  # never replaces a CA


def test_superlink_command_is_secure_unless_asked(tmp_path):
    files = make_certificates(tmp_path, 1)
    secure = superlink_command(tmp_path, "0.0.0.0", 9092, tmp_path / "state.db")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(files.server_cert)
    assert "--insecure" not in secure
    insecure = superlink_command(None, "127.0.0.1", 9092, tmp_path / "state.db")
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeploymentError, match="fedgen deploy certs"):
        superlink_command(tmp_path / "nowhere", "0.0.0.0", 9092, tmp_path / "state.db")


def test_supernode_command_and_the_node_config_flower_reads(tmp_path):
    files = make_certificates(tmp_path, 1)
    data = tmp_path / "my data"  # a space in the path survives Flower's parsing
    config = node_config(2, 3, data, data_path=str(tmp_path / "xrays"))
    command = supernode_command("coordinator.example.org:9092", files.ca, files.node_key(0), config, 9094)
    assert command[command.index("--root-certificates") + 1] == str(files.ca)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(files.node_key(0))
    parsed = parse_config_args([command[command.index("--node-config") + 1]])
    assert parsed == {"partition-id": 2, "num-partitions": 3, "data-dir": str(data),
                      "data-path": str(tmp_path / "xrays")}
    assert "--insecure" in supernode_command("h:1", None, None, config, 9094)
    with pytest.raises(DeploymentError):
        supernode_command("h:1", files.ca, None, config, 9094)  # TLS without a node key: refused
    # By default the SuperNode leaves its ClientApp to fedgen's warm executor, on its Runtime API port.
    assert command[command.index("--isolation") + 1] == "process"
    assert executor_command(9094, 123)[3:7] == ["--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "123"]
    assert "subprocess" in supernode_command("h:1", None, None, config, 9094, isolation="subprocess")
    with pytest.raises(DeploymentError):
        supernode_command("h:1", None, None, config, 9094, isolation="thread")


def test_deploy_commands_refuse_to_run_without_tls_material(tmp_path, capsys):
    assert cli_main(["deploy", "supernode", "--print-only", "--partition-id", "0", "--num-partitions", "1",
                     "--data-dir", str(tmp_path)]) == 1
    assert "--ca" in capsys.readouterr().err
    assert cli_main(["deploy", "supernode", "--print-only", "--insecure", "--partition-id", "0",
                     "--num-partitions", "1", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "WARNING: --insecure" in out.err and "--insecure" in out.out


def test_a_deployed_hospital_finds_its_silo_and_keeps_its_ledger_at_home(tmp_path):
    cfg = load_config(TINY)
    node = {"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path)}
    assert site_silo(cfg, 1, node).records() == silos_for(cfg)[1].records()  # synthetic: its partition
    assert site_home(tmp_path, "pilot") == tmp_path.resolve() / "fedgen" / "pilot"
    with pytest.raises(ConfigError, match="num-partitions"):
        site_silo(cfg, 1, {**node, "num-partitions": 4})
    with pytest.raises(ConfigError):
        site_home(tmp_path, "../escape")


def test_a_deployed_hospital_reads_its_own_images(tmp_path):
    folder = tmp_path / "xrays"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"img{i}.png")
    cfg = load_config([*TINY, "data=folder", "data.path=null"])  # the coordinator has no images
    silo = site_silo(cfg, 0, {"partition-id": 0, "num-partitions": 3, "data-path": str(folder)})
    assert len(silo.members) + len(silo.heldout) + len(silo.validation) == 12
    assert silo.train.images.shape[1:] == (1, 16, 16)


def test_client_app_puts_a_deployed_hospital_home_in_its_data_dir(tmp_path):
    from clients.app import hospital_for

    run_config = {"overrides": '["data.num_patients=48", "data.image_size=16", "training.batch_size=16", "name=pilot"]',
                  "run-dir": str(tmp_path / "coordinator" / "runs" / "pilot")}
    deployed = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                       node_config={"partition-id": 0, "num-partitions": 3, "data-dir": str(tmp_path / "h0")})
    hospital = hospital_for(deployed)
    assert hospital.home == tmp_path.resolve() / "h0" / "fedgen" / "pilot"
    assert (hospital.home / "records.json").exists()
    assert not (tmp_path / "coordinator").exists()  # nothing of the hospital's at the coordinator
    simulated = Context(run_id=1, node_id=8, state=RecordDict(), run_config=run_config,
                        node_config={"partition-id": 0, "num-partitions": 3})
    assert hospital_for(simulated).home == tmp_path.resolve() / "coordinator" / "runs" / "pilot" / "hospitals" / "hospital-0"
    # A deployed ClientApp process lives across runs (clients/executor.py): it keeps only the
    # current run's hospitals.
    from clients.app import _hospitals

    later = {**run_config, "run-dir": str(tmp_path / "coordinator" / "runs" / "later")}
    hospital_for(Context(run_id=2, node_id=7, state=RecordDict(), run_config=later, node_config=deployed.node_config))
    assert [key[1] for key in _hospitals] == [later["run-dir"]]


def test_deploy_run_refuses_reproducible_noise_unless_insecure(tmp_path):
    from fedgen.running.deploy import deploy_run

    overrides = ["privacy.reproducible_noise=true", f"runs_dir={tmp_path}"]
    with pytest.raises(DeploymentError, match="privacy.reproducible_noise"):
        deploy_run(overrides, "127.0.0.1:9092", tmp_path / "ca.crt", print_only=True, echo=lambda _: None)
    shown = []
    deploy_run(overrides, "127.0.0.1:9092", None, print_only=True, echo=shown.append)  # a local test
    assert shown and "flwr" in shown[0]


class SlowGrid:
    """A Grid whose replies can be pulled `delay` seconds after the push."""

    def __init__(self, delay: float):
        self.delay, self.pulls, self.pushed = delay, 0, 0.0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if time.monotonic() - self.pushed < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in message_ids]


def test_the_server_takes_replies_as_they_come_not_on_flowers_3_s_poll():
    grid = SlowGrid(delay=0.3)
    started = time.monotonic()
    replies = list(PromptGrid(grid).send_and_receive(["a", "b"]))  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert time.monotonic() - started < 1.0  # Flower's deployment Grid pulls every 3 s
    started = time.monotonic()
    assert list(PromptGrid(SlowGrid(delay=60)).send_and_receive(["a"], timeout=0.3)) == []  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 1.0


def test_the_supernode_polls_flower_loop_with_capped_sleeps(monkeypatch):
    """fedgen's SuperNodes run Flower's own loop, its 3 s idle sleep capped at 0.2 s."""
    import time

    from flwr.supernode import start_client_internal as loop

    from clients import prompt_supernode

    assert supernode_command("h:1", None, None, "k=1", 9094)[1:3] == ["-m", "clients.prompt_supernode"]
    monkeypatch.setattr(loop, "time", time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    assert prompt_supernode.shorten_polls()  # (its object pulls: the test below)
    started = time.perf_counter()
    loop.time.sleep(3)
    assert time.perf_counter() - started < 1.0 and loop.time.monotonic() > 0
    monkeypatch.setattr(loop, "time", object())  # a Flower whose loop no longer matches: left alone
    with pytest.warns(UserWarning, match="Flower's pace"):
        assert not prompt_supernode.shorten_polls()


def _seconds_to_pull_a_late_object(pull_objects) -> float:
    """Seconds `pull_objects` takes over an object that is still being uploaded at the first ask."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    asks = []

    def pull_object(object_id: str) -> bytes:
        asks.append(object_id)
        if len(asks) == 1:
            raise ObjectUnavailableError(object_id)
        return b"weights"

    started = time.perf_counter()
    assert pull_objects(["w"], pull_object_fn=pull_object) == {"w": b"weights"} and asks == ["w", "w"]
    return time.perf_counter() - started


@pytest.mark.parametrize("flower_module", ["flwr.superlink.grid.http_grid", "flwr.supernode.start_client_internal"])
def test_a_half_uploaded_message_is_pulled_again_promptly(monkeypatch, flower_module):
    """A reply found before its weights are uploaded is asked for again after FIRST_RETRY s, on
    the coordinator's side and the SuperNode's; Flower's own retry waits 1 s."""
    import importlib

    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    module = importlib.import_module(flower_module)
    monkeypatch.setattr(module, "pull_objects", pull_objects)  # Flower's own; restored after the test
    assert _seconds_to_pull_a_late_object(module.pull_objects) >= 0.75  # Flower's: 1 s +- 20%
    if flower_module.endswith("http_grid"):  # the ServerApp's PromptGrid patches its deployment Grid
        PromptGrid(module.HttpGrid("127.0.0.1:1", insecure=True, token="t"))
    else:
        assert prompt_object_pulls(module)
    assert prompt_object_pulls(module)  # again: patched once
    assert module.pull_objects.keywords == {"initial_backoff": FIRST_RETRY}
    assert _seconds_to_pull_a_late_object(module.pull_objects) < 0.5
    monkeypatch.setattr(module, "pull_objects", lambda *a, **k: {})  # a Flower that no longer matches
    with pytest.warns(UserWarning, match="Flower's pace"):
        assert not prompt_object_pulls(module)


def test_a_killed_deploy_command_stops_the_flower_processes_it_started(tmp_path):
    """SIGTERM (a service manager, `timeout`) must unwind `fedgen deploy ...` as Ctrl-C does:
    a killed command that left its SuperLink running would hold the port and the database."""
    port, tag = free_port(), uuid.uuid4().hex
    env = {**os.environ, TAG_VARIABLE: tag}
    command = [sys.executable, "-c", "import sys; from fedgen.cli import main; sys.exit(main())",
               "deploy", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
               "--state", str(tmp_path / "superlink")]
    fedgen = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("flower-superlink" in _command_line(p) for p in tagged(tag)):
            time.sleep(0.2)
        assert any("flower-superlink" in _command_line(p) for p in tagged(tag)), "the SuperLink never started"
        fedgen.send_signal(signal.SIGTERM)
        fedgen.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and [p for p in tagged(tag) if alive(p)]:
            time.sleep(0.2)
        assert [_command_line(p) for p in tagged(tag) if alive(p)] == []
    finally:
        fedgen.kill()
        for pid in tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
