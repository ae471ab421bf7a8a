"""End to end: a real deployment on this machine. One flower-superlink and 3 flower-supernode
processes over TLS with SuperNode authentication, each SuperNode with its own data directory
(`fedgen.running.loopback`, the same code as `fedgen deploy demo`); a SuperNode crashed mid-round, the
coordinator crashed and restarted; refused nodes; a variant with each hospital in its own network
namespace. A failing check prints the tail of every process's log."""

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fedgen.config import load_config
from fedgen.model import build_unet
from fedgen.privacy.accounting import EpsilonLedger, epsilon_of
from fedgen.privacy.lifetime import LIFETIME_FILE, SiteLedger
from fedgen.running.certificates import CertificateFiles, make_node_key
from fedgen.running.loopback import LoopbackFederation, Namespaces

pytestmark = pytest.mark.slow
ROUND_SECONDS = 420  # generous: on 2 busy cores a round of 3 tiny hospitals has taken 90 s


def overrides(runs_dir: Path, name: str, rounds: int) -> list[str]:
    return [
        f"runs_dir={runs_dir}",
        f"name={name}",
        "federation.num_hospitals=3",
        f"federation.num_rounds={rounds}",
        "federation.local_epochs=1",
        "federation.min_train_nodes=2",  # a round completes with 2 of the 3 hospitals
        "federation.min_available_nodes=3",  # but starts only when all 3 are connected
        "federation.round_timeout=600",
        "federation.num_samples=4",
        "federation.sampling_steps=5",
        "data.num_patients=48",
        "data.image_size=16",
        "data.validation_fraction=0",  # no evaluate messages: one message per hospital and round
        "training.batch_size=16",
        "pretrain.num_patients=64",  # the coordinator pretrains a small public base first
        "pretrain.epochs=1",
    ]


@contextlib.contextmanager
def logs_on_failure(federation: LoopbackFederation):
    try:
        yield
    except BaseException as err:
        raise AssertionError(f"{err}\n\n{federation.tails()}") from err


def wait_for(what: str, ready, timeout: float, watch=None) -> None:
    """Poll `ready()`; fail with `what` on timeout, or at once if the `watch` process exits."""
    deadline = time.time() + timeout
    while not ready():
        if watch is not None and watch.poll() is not None:
            raise AssertionError(f"the process {watch.args[:3]} exited ({watch.returncode}) while waiting for {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def ledger_of(federation: LoopbackFederation, hospital: int, run: str) -> EpsilonLedger:
    return EpsilonLedger.load(federation.data_dir(hospital) / "fedgen" / run / "ledger.json")


def assert_one_accountant(ledger: EpsilonLedger) -> None:
    """Epsilon equals one accountant that ran every step the hospital released, whatever the
    interruptions in between."""
    one = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, ledger.steps)], "rdp", ledger.delta)
    assert ledger.epsilon == pytest.approx(one, rel=1e-12)
    assert ledger.steps == sum(r["steps"] for r in ledger.rounds)
    assert [r["epsilon"] for r in ledger.rounds] == sorted(r["epsilon"] for r in ledger.rounds)


def freeze_clientapp(federation: LoopbackFederation, hospital: int) -> None:
    """SIGSTOP hospital `hospital`'s ClientApp executor (beside its SuperNode, `--isolation
    process`): the SuperNode still takes its next message, which then waits, unanswered."""
    os.kill(federation.nodes[hospital].processes[1].pid, signal.SIGSTOP)


def checkpoint(run: Path, r: int) -> dict:
    """{'round', 'model', 'history'}: written before metrics.json, so read the record from here."""
    return torch.load(run / "checkpoints" / f"round-{r:04d}.pt", weights_only=False)


def test_hospitals_in_their_own_network_namespaces(tmp_path):
    # First in the module: it runs before the shared loopback federation below starts.
    reason = Namespaces.available()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    fed = LoopbackFederation(tmp_path / "netns", num_nodes=3, namespaces=True)
    try:
        with logs_on_failure(fed):
            fed.start()
            config = overrides(tmp_path / "runs", "netns", rounds=1)
            run = fed.submit(config, "coordinator")
            wait_for("the run to finish", lambda: run.poll() is not None, 2 * ROUND_SECONDS)
            assert run.returncode == 0, fed.log("coordinator").read_text()
            history = json.loads((tmp_path / "runs" / "netns" / "metrics.json").read_text())["history"]
            assert sorted(history[0]["train"]) == ["0", "1", "2"]
            superlink_log = fed.log("superlink").read_text()
            for h in range(3):
                assert_one_accountant(ledger_of(fed, h, "netns"))
                assert f"{fed.netns.address(h)}:" in superlink_log  # each hospital dialled from its own address
    finally:
        fed.close()
    assert fed.leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in fed.netns.names)  # the namespaces are gone too


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LoopbackFederation(tmp_path_factory.mktemp("loopback"), num_nodes=3)
    try:
        with logs_on_failure(fed):
            fed.start()
        yield fed
    finally:
        fed.close()
        assert fed.leftovers() == []  # every process it started is gone


def test_unregistered_nodes_and_clients_without_the_ca_are_refused(federation, tmp_path):
    stranger = CertificateFiles(tmp_path)
    make_node_key(stranger, 0)  # a well-formed key the SuperLink never registered
    attempts = {
        "refused-key": federation.supernode(0, key=stranger.node_key(0), max_retries=1, name="refused-key"),
        "refused-no-ca": federation.supernode(1, tls="system", max_retries=1, name="refused-no-ca"),
        "refused-plain": federation.supernode(2, tls="none", max_retries=1, name="refused-plain"),
    }  # an unregistered key; TLS without the federation's CA; no TLS at all
    with logs_on_failure(federation):
        for name, (_, proc) in attempts.items():
            wait_for(f"the SuperNode ({name}) to give up", lambda p=proc: p.poll() is not None, 120)
            assert proc.returncode != 0, name
            assert "could not establish a connection to the SuperLink" in federation.log(name).read_text(), name
        assert "No SuperNode found with the given public key" in federation.log("superlink").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in federation.log("refused-no-ca").read_text()
        assert len(federation.online()) == 3  # still exactly the three registered hospitals
        # A plain-HTTP client gets nothing from the TLS port.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{federation.address}/health", timeout=10)
    for group, _ in attempts.values():
        group.stop()


def test_private_selection_over_the_deployed_federation(federation, tmp_path):
    """`fedgen deploy run --select`: one round of noisy votes over TLS; each hospital's release is
    on its own site's lifetime ledger, in its own data directory, never at the coordinator."""
    runs = tmp_path / "runs"
    config = [*overrides(runs, "vote", rounds=1), "selection.pool_size=128", "selection.num_samples=8"]
    with logs_on_failure(federation):
        run = federation.submit(["--select", *config], "coordinator-select")
        wait_for("the selection to finish", lambda: run.poll() is not None, ROUND_SECONDS)
        output = federation.log("coordinator-select").read_text()
        assert run.returncode == 0, output
    summary = json.loads((runs / "vote" / "selection.json").read_text())
    assert summary["hospitals_voted"] == [0, 1, 2] and summary["noise_multiplier"] > 0
    for h in range(3):
        entries = SiteLedger.load(federation.data_dir(h) / "fedgen" / LIFETIME_FILE).entries
        assert [e["history"] for k, e in entries.items() if k.endswith("#selection")] == [
            [[summary["noise_multiplier"], 1.0, 1]]]
    assert not (runs / "vote" / "hospitals").exists()  # the coordinator holds no hospital's records
    assert "(8, 1e-05)-differential privacy" in (runs / "vote" / "report.md").read_text()


def test_two_rounds_then_a_crashed_supernode_and_a_crashed_coordinator(federation, tmp_path):
    runs, name = tmp_path / "runs", "loop"
    run = runs / name
    config = overrides(runs, name, rounds=4)
    with logs_on_failure(federation):
        first = federation.submit(config, "coordinator-1")
        started = time.time()
        while not (run / "checkpoints" / "round-0002.pt").exists():  # closely: round 3 starts right after it
            assert first.poll() is None and time.time() - started < 2 * ROUND_SECONDS, "no round 2 checkpoint"
            time.sleep(0.02)
        # Hospital 2's warm ClientApp answers a tiny round within a second: freeze it now, so that
        # its SuperNode is sure to die in round 3 holding the instruction (below).
        freeze_clientapp(federation, 2)
        two_rounds = time.time() - started

        # Two rounds over TLS: the global model moved each round, and each hospital's ledger, in
        # its own data directory, equals one accountant over both rounds' steps.
        cfg = load_config(config)
        torch.manual_seed(cfg.seed)
        initial = build_unet(cfg.model, cfg.data.image_size).state_dict()
        r1, r2 = checkpoint(run, 1)["model"], checkpoint(run, 2)["model"]
        assert any(not torch.equal(initial[k], r1[k]) for k in initial)
        assert any(not torch.equal(r1[k], r2[k]) for k in r1)
        history = checkpoint(run, 2)["history"]
        assert [sorted(r["train"]) for r in history] == [[0, 1, 2]] * 2
        before_crash = {}
        for h in range(3):
            ledger = ledger_of(federation, h, name)
            assert [r["round"] for r in ledger.rounds][:2] == [1, 2]
            two = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, sum(r["steps"] for r in ledger.rounds[:2]))],
                             "rdp", ledger.delta)
            assert ledger.rounds[1]["epsilon"] == pytest.approx(two, rel=1e-12)
            assert history[1]["train"][h]["epsilon"] == pytest.approx(two, rel=1e-12)
            before_crash[h] = ledger.rounds[:2]
        assert not (run / "hospitals").exists()  # the coordinator never holds a hospital's ledger

        # Round 3: hospital 2's SuperNode dies holding the round's instruction. The round completes
        # with the other two once Flower notices (heartbeats, within about a minute).
        wait_for("hospital 2's SuperNode to receive round 3's instruction",  # (no evaluate messages here)
                 lambda: federation.log("supernode-2").read_text().count("Receiving: train message") == 3,
                 ROUND_SECONDS, first)
        federation.crash_node(2)
        wait_for("round 3's checkpoint", (run / "checkpoints" / "round-0003.pt").exists, ROUND_SECONDS, first)
        third = checkpoint(run, 3)["history"][2]
        assert sorted(third["train"]) == [0, 1]
        assert [f["node"] for f in third["failures"]] == [int(federation.node_ids[2])]
        wait_for("the failure in `fedgen deploy run`'s output",  # it streams in after the checkpoint
                 lambda: "failed this round" in federation.log("coordinator-1").read_text(), 60)

        # The coordinator's machine crashes too (SuperLink and ServerApp killed). It restarts with
        # the same database; hospital 2 rejoins once the SuperLink has seen it go; the same
        # command resumes from round 3's checkpoint.
        federation.crash_superlink()
        first.kill()
        federation.start_superlink()
        wait_for("hospital 2 to be seen offline", lambda: federation.status(2) == "offline", 180)
        federation.start_node(2)
        second = federation.submit(config, "coordinator-2")
        wait_for("the resumed run to finish", lambda: second.poll() is not None, 2 * ROUND_SECONDS)
        output = federation.log("coordinator-2").read_text()
        assert second.returncode == 0, output
        assert "resuming 'loop' after round 3" in output

        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed" and (run / "pipeline" / "model_index.json").exists()
        assert [r["round"] for r in metrics["history"]] == [1, 2, 3, 4]
        assert sorted(metrics["history"][3]["train"]) == ["0", "1", "2"]
        for h in range(3):
            ledger = ledger_of(federation, h, name)
            assert_one_accountant(ledger)
            assert ledger.rounds[:2] == before_crash[h]  # continued, never reset
            assert [r["round"] for r in ledger.rounds] == ([1, 2, 4] if h == 2 else [1, 2, 3, 4])
            assert metrics["ledgers"][str(h)]["epsilon"] == pytest.approx(ledger.epsilon)
    print(f"\nloopback federation: 2 rounds in {two_rounds:.1f} s (from `fedgen deploy run` to round 2's checkpoint)")
