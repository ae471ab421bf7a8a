"""End to end: the real Flower simulation (local SuperLink, `flwr run`, Ray), through `fedgen simulate`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedgen.cli import main as cli_main
from fedgen.config import ConfigError, load_config
from fedgen.evaluation.card_check import card_problems
from fedgen.model import build_unet
from fedgen.privacy.accounting import EpsilonLedger, epsilon_of
from fedgen.running.apart import call_apart
from fedgen.running.processes import TAG_VARIABLE
from fedgen.running.simulate import prepare_simulation

FEDGEN = str(Path(sys.executable).parent / "fedgen")


def tiny_overrides(runs_dir: Path, name: str) -> list[str]:
    return [
        f"runs_dir={runs_dir}",
        f"name={name}",
        "federation.num_hospitals=2",
        "federation.num_rounds=2",
        "federation.local_epochs=1",
        "federation.num_samples=4",
        "federation.sampling_steps=5",
        "data.num_patients=48",
        "data.image_size=16",
        "training.batch_size=16",
        "pretrain.num_patients=64",  # the default path: a (small) public base, pretrained first
        "pretrain.epochs=1",
    ]


# Every process the tests' fedgen commands start carries this tag (and no other job's does).
TAG = f"fedgen-test-{os.getpid()}"
TAGGED_ENV = {**os.environ, TAG_VARIABLE: TAG}


def run_fedgen(overrides: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FEDGEN, "simulate", *overrides], capture_output=True, text=True, timeout=600, env=TAGGED_ENV, **kwargs
    )


def fedgen_processes_left(ignore: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Live processes started by these tests' fedgen commands (they carry TAG), except `ignore`."""
    needle = f"{TAG_VARIABLE}={TAG}".encode()
    left = []
    for entry in os.listdir("/proc"):
        try:
            if (
                entry.isdigit()
                and int(entry) != os.getpid()
                and needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
            ):
                left.append(int(entry))
        except OSError:
            continue
    return [p for p in left if p not in ignore]


def checkpoint_model(run: Path, r: int) -> dict:
    return torch.load(run / "checkpoints" / f"round-{r:04d}.pt", weights_only=False)["model"]


def assert_ledger_equals_one_accountant(run: Path, hospital: int, rounds: int) -> EpsilonLedger:
    ledger = EpsilonLedger.load(run / "hospitals" / f"hospital-{hospital}" / "ledger.json")
    per_round = ledger.steps // rounds
    assert [r["round"] for r in ledger.rounds] == list(range(1, rounds + 1))
    one = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, ledger.steps)], "rdp", ledger.delta)
    assert ledger.epsilon == pytest.approx(one, rel=1e-12)
    first = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, per_round)], "rdp", ledger.delta)
    assert ledger.rounds[0]["epsilon"] == pytest.approx(first, rel=1e-12)
    assert ledger.rounds[0]["epsilon"] < ledger.rounds[-1]["epsilon"] <= ledger.budget
    return ledger


@pytest.mark.slow
def test_simulation_trains_accounts_and_releases(tmp_path):
    already = set(fedgen_processes_left())
    overrides = tiny_overrides(tmp_path, "e2e")
    done = run_fedgen(overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tensorboard --logdir" in done.stdout and "round 2/2" in done.stdout
    run = tmp_path / "e2e"

    # The run directory holds what the issue lists.
    for item in ("config.yaml", "command.txt", "metrics.json", "pipeline/model_index.json",
                 "checkpoints/round-0001.pt", "checkpoints/round-0002.pt"):
        assert (run / item).exists(), item
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # It started from the public base it pretrained first, and says so.
    assert "pretraining the base model" in done.stdout
    base = json.loads((run / "base.json").read_text())
    pretrained = json.loads((Path(base["path"]).parent / "pretrain.json").read_text())
    assert base["init"] == "pretrained" and base["weights_sha256"] == pretrained["weights_sha256"]
    card = (run / "pipeline" / "README.md").read_text()
    assert base["weights_sha256"] in card and "secret noise" in card
    for h in (0, 1):
        records = json.loads((run / "hospitals" / f"hospital-{h}" / "records.json").read_text())
        assert records["roles"]["member"] and records["roles"]["heldout"]

    # The global model changed, round after round.
    cfg = load_config(overrides)
    torch.manual_seed(cfg.seed)
    initial = build_unet(cfg.model, cfg.data.image_size).state_dict()
    r1, r2 = checkpoint_model(run, 1), checkpoint_model(run, 2)
    assert any(not torch.equal(initial[k], r1[k]) for k in initial)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)

    # Epsilon grows across rounds and equals one accountant that ran both rounds' steps.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["history"]) == 2
    troubles = [(r["round"], r["failures"], r["rejected"]) for r in metrics["history"] if r["failures"] or r["rejected"]]
    assert not troubles and done.stdout.count("2/2 hospitals ok") == 2, f"{troubles}\n{done.stdout}"
    assert card_problems(run, hospitals=2, rounds=2) == []
    for h in (0, 1):
        ledger = assert_ledger_equals_one_accountant(run, h, rounds=2)
        reported = [r["train"][str(h)]["epsilon"] for r in metrics["history"]]
        assert reported[0] < reported[1] == pytest.approx(ledger.epsilon)
        assert metrics["ledgers"][str(h)]["epsilon"] == pytest.approx(ledger.epsilon)
        card = json.loads((run / "privacy.json").read_text())["hospitals"][str(h)]
        assert card["epsilon_recomputed"] == pytest.approx(ledger.epsilon, rel=1e-9)  # from the card's history
        assert card["steps"] == ledger.steps and card["largest_patient_epsilon"] >= ledger.epsilon

    # Anyone can load the release with plain diffusers and generate.
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(run / "pipeline"))
    image = pipe(batch_size=1, num_inference_steps=3, output_type="np").images
    assert image.shape == (1, 16, 16, 1)
    assert fedgen_processes_left(already) == []

    # The attacks read the run back: members and held-out images rebuilt from its records.
    attacked = subprocess.run(
        [FEDGEN, "attack", str(run), "--per-hospital", "8", "--samples", "8", "--batch-size", "16"],
        capture_output=True, text=True, timeout=600, env=TAGGED_ENV,
    )
    assert attacked.returncode == 0, attacked.stdout + attacked.stderr
    report = json.loads((run / "attack.json").read_text())
    assert set(report["attacks"]) == {"loss", "pia", "pian", "secmi", "sima"}
    for result in report["attacks"].values():
        assert result["num_members"] == result["num_nonmembers"] == 16
        assert 0.0 <= result["auc"] <= 1.0
        assert result["epsilon_lb_clopper_pearson"] <= max(report["accountant_epsilon"].values())
    assert set(report["hospitals"]) == {"0", "1"} and report["alarms"] == []
    assert report["extraction"]["num_samples"] == 8
    assert (run / "roc.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("attack/pia/auc", "attack/pia/tpr@1%fpr", "attack/pia/epsilon_lb", "privacy/epsilon_max",
                "train/loss_mean", "utility/val_loss", "fl/clients_failed"):
        assert tag in scalars, tag


@pytest.mark.slow
def test_a_refusing_hospital_is_named_and_the_run_is_incomplete(tmp_path):
    run = tmp_path / "faulty"
    broken = run / "hospitals" / "hospital-1" / "ledger.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{ this is not a ledger")  # hospital 1 refuses when it opens its ledger
    done = run_fedgen(tiny_overrides(tmp_path, "faulty"))
    # By default a round needs every hospital: both rounds leave the model unchanged.
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ended 'incomplete'" in done.stderr and "hospital-1/ledger.json" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "incomplete" and metrics["summary"]["rounds_model_unchanged"] == [1, 2]
    for record in metrics["history"]:
        assert set(record["train"]) == {"0"}
        assert len(record["failures"]) == 1 and "ledger" in record["failures"][0]["reason"]
    assert "failed this round" in done.stdout
    assert broken.read_text() == "{ this is not a ledger"  # the hospital's file is never overwritten


@pytest.mark.slow
def test_interrupted_run_resumes_and_the_ledger_continues(tmp_path):
    already = set(fedgen_processes_left())
    # Longer rounds than the other tiny runs: Ctrl-C lands after round 1's checkpoint, and a
    # round 2 of a second or so could finish the run before the interrupt reaches Flower.
    overrides = [*tiny_overrides(tmp_path, "resume"), "federation.local_epochs=25"]
    run = tmp_path / "resume"
    first = subprocess.Popen(
        [FEDGEN, "simulate", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TAGGED_ENV,
        # As from an interactive shell: a job started in the background (`cmd &` in a script, as CI
        # may run) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 400
    metrics_file = run / "metrics.json"
    while not (metrics_file.exists() and "1" in json.loads(metrics_file.read_text())["checkpoints"]):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    first.wait(timeout=120)
    assert "interrupted" in first.stdout.read()  # the run did not finish before the Ctrl-C
    assert fedgen_processes_left(already) == []  # every process it started is gone
    assert json.loads(metrics_file.read_text())["status"] == "running"
    hospitals = run / "hospitals"
    kept = {p: p.read_bytes() for p in [*hospitals.rglob("*"), run / "checkpoints" / "round-0001.pt"] if p.is_file()}

    # A deleted ledger would restart that hospital's epsilon at 0: the resume refuses, spending nothing.
    (hospitals / "hospital-0" / "ledger.json").unlink()
    refused = run_fedgen(overrides)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refusing to resume" in refused.stderr and "hospital 0" in refused.stderr
    assert "coordinator recorded" in refused.stderr and "Traceback" not in refused.stdout + refused.stderr
    assert not (hospitals / "hospital-0" / "ledger.json").exists()
    assert all(p.read_bytes() == data for p, data in kept.items() if p.name != "ledger.json" or "hospital-1" in str(p))
    refusal = json.loads(metrics_file.read_text())
    assert refusal["status"] == "refused" and not (run / "checkpoints" / "round-0002.pt").exists()
    spent = EpsilonLedger.load(hospitals / "hospital-1" / "ledger.json").epsilon
    assert refusal["ledgers"]["1"]["epsilon"] == pytest.approx(spent)  # what the ledger says was spent
    (hospitals / "hospital-0" / "ledger.json").write_bytes(kept[hospitals / "hospital-0" / "ledger.json"])

    # A checkpoint whose weights were replaced by NaN does not verify: refused before Flower starts.
    checkpoint = run / "checkpoints" / "round-0001.pt"
    saved = torch.load(checkpoint, weights_only=False)
    saved["model"] = {k: torch.full_like(v, float("nan")) for k, v in saved["model"].items()}
    torch.save(saved, checkpoint)
    nan = run_fedgen(overrides)
    assert nan.returncode == 2 and "round-0001.pt" in nan.stderr and "Traceback" not in nan.stderr, nan.stderr
    assert all(p.read_bytes() == data for p, data in kept.items() if p != checkpoint)
    checkpoint.write_bytes(kept[checkpoint])

    done = run_fedgen(overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["history"]] == [1, 2]
    for h in (0, 1):
        assert_ledger_equals_one_accountant(run, h, rounds=2)


@pytest.mark.slow
def test_twenty_hospitals_complete_and_every_ledger_is_right(tmp_path):
    """Scale: 20 simulated hospitals on small silos (3 patients, 6 images each) in one round, with
    no more Ray workers than the machine's cores can use (`benchmarks/scale.py` goes to 100)."""
    overrides = [*tiny_overrides(tmp_path, "twenty"), "federation.num_hospitals=20", "federation.num_rounds=1",
                 "data.num_patients=80", "training.batch_size=4", "model.init=null", "federation.sample_every=0"]
    done = run_fedgen(overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "twenty"
    metrics = json.loads((run / "metrics.json").read_text())
    (record,) = metrics["history"]
    assert sorted(record["train"], key=int) == [str(h) for h in range(20)] and not record["failures"]
    assert card_problems(run, hospitals=20, rounds=1) == []
    cards = json.loads((run / "privacy.json").read_text())["hospitals"]
    for h in range(20):
        ledger = EpsilonLedger.load(run / "hospitals" / f"hospital-{h}" / "ledger.json")
        assert [r["round"] for r in ledger.rounds] == [1] and ledger.steps == record["train"][str(h)]["steps"]
        one = epsilon_of([(ledger.noise_multiplier, ledger.sample_rate, ledger.steps)], "rdp", ledger.delta)
        assert ledger.epsilon == pytest.approx(one, rel=1e-12) and one <= ledger.budget
        assert record["train"][str(h)]["epsilon"] == pytest.approx(one) == cards[str(h)]["epsilon_recomputed"]


def test_bad_override_fails_before_any_process_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(TAG_VARIABLE, TAG)  # anything it started would carry the tests' tag
    already = set(fedgen_processes_left())
    assert cli_main(["simulate", f"runs_dir={tmp_path}", "federation.num_hospitals=many"]) == 2
    assert "federation.num_hospitals" in capsys.readouterr().err
    assert cli_main(["simulate", f"runs_dir={tmp_path}", "privacy.target_epsilon=-1"]) == 2
    assert "privacy.target_epsilon" in capsys.readouterr().err
    assert cli_main(["simulate", f"runs_dir={tmp_path}", "data.num_patients=30", "training.batch_size=8",
                     "privacy.delta=0.5"]) == 2
    assert "privacy.delta" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run directory, no Flower process
    assert fedgen_processes_left(already) == []


@pytest.mark.parametrize(("hospitals", "cores", "parallel", "expected"), [
    (3, 2, 0, 3),  # a small federation trains side by side, in one wave
    (10, 2, 0, 2),  # a large one: one worker per core (each holds its own torch)
    (100, 2, 0, 2),
    (100, 16, 0, 8),
    (5, 16, 0, 5),
    (100, 2, 4, 4),  # the user's number
])
def test_simulated_hospitals_in_parallel(hospitals, cores, parallel, expected):
    from fedgen.running.simulate import parallel_hospitals

    fed = load_config([f"federation.num_hospitals={hospitals}", f"federation.parallel_clients={parallel}"]).federation
    assert parallel_hospitals(fed, cores) == expected


def test_the_launcher_plans_in_a_child_process_and_holds_no_torch(tmp_path):
    """`fedgen simulate` waits on Flower for the whole run: its planning (torch, diffusers,
    Opacus) runs in a child process, whose lines, result and errors come back here."""
    overrides = [*tiny_overrides(tmp_path, "planned"), "model.init=null"]  # no pretraining here
    lines: list[str] = []
    prepared = call_apart(prepare_simulation, overrides, ["test"], echo=lines.append)
    assert prepared == {"complete": False, "gpus": 1.0 if torch.cuda.is_available() else 0.0}
    assert [line.split(":")[0] for line in lines[-2:]] == ["  hospital 0", "  hospital 1"]
    assert (tmp_path / "planned" / "config.yaml").exists()  # the child prepared the run dir
    with pytest.raises(ConfigError, match="federation.num_hospitals") as refused:
        call_apart(prepare_simulation, [*overrides, "federation.num_hospitals=many"], ["test"], echo=lines.append)
    assert "in a child process of the launcher" in "".join(refused.value.__notes__)
    # What the launcher itself imports, from the command line to the run: no torch.
    probe = ("import sys; import fedgen.running.simulate as s; from fedgen.cli import main\n"
             "s.plan_apart = lambda *a, **k: sys.exit('torch' in sys.modules)\n"
             f"main(['simulate', 'runs_dir={tmp_path}', 'name=probe'])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
