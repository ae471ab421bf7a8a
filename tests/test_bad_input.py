"""Every command's bad input: one line `fedgen: error: ...` naming the setting or file, a non-zero
exit, no traceback, and nothing on disk changed. Each case runs the real CLI in-process.

The prepared world (a tiny run directory as training leaves one, without Flower) is hashed, file
by file and folder by folder, before and after each case."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_utility import TINY, make_run

from fedgen.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small data: the cases that get as far as building silos do it in a second.
SMALL = ["model.init=null", "data.num_patients=48", "data.image_size=16", "training.batch_size=16"]
SIM = ["simulate", "runs_dir={world}/runs", "name=tiny", *SMALL]  # the prepared run's own folder
RUN = "{world}/runs/tiny"


def _edit_member_hash(run: Path) -> None:
    path = run / "hospitals" / "hospital-0" / "records.json"
    records = json.loads(path.read_text())
    records["roles"]["member"][0]["hash"] = "0" * 64
    path.write_text(json.dumps(records))


def _delete_records(run: Path) -> None:
    (run / "hospitals" / "hospital-1" / "records.json").unlink()


def _garble_records(run: Path) -> None:
    (run / "hospitals" / "hospital-0" / "records.json").write_text("{not json")


CASES = [
    # (arguments, what the message must name, how to damage a copy of the run first)
    # Hydra overrides: unknown keys, options and types
    ([*SIM, "+federation.num_round=3"], ["federation.num_round", "federation.num_rounds"]),
    ([*SIM, "federation.num_round=3"], ["federation.num_round", "federation.num_rounds"]),
    ([*SIM, "++privacy.epsilon=1"], ["privacy.epsilon"]),
    ([*SIM, "+nosuch=1"], ["nosuch"]),
    ([*SIM, "privacy=eps99"], ["privacy=eps99", "eps8"]),
    ([*SIM, "data=nope"], ["data=nope", "synthetic"]),
    ([*SIM, "experiment=foo"], ["experiment=foo", "leak"]),
    ([*SIM, "federation.num_rounds=abc"], ["federation.num_rounds"]),
    ([*SIM, "federation.num_hospitals=1.5"], ["federation.num_hospitals"]),
    ([*SIM, "privacy.enabled=maybe"], ["privacy.enabled"]),
    ([*SIM, "federation"], ["federation"]),
    # impossible settings
    ([*SIM, "privacy.target_epsilon=-1"], ["privacy.target_epsilon"]),
    ([*SIM, "privacy.delta=1"], ["privacy.delta"]),
    ([*SIM, "privacy.delta=0.1"], ["privacy.delta", "1/N"]),  # silos of 20 images
    ([*SIM, "privacy.accountant=gdp"], ["privacy.accountant"]),
    ([*SIM, "federation.num_hospitals=0"], ["federation.num_hospitals"]),
    ([*SIM, "federation.num_hospitals=1000"], ["federation.num_hospitals"]),
    ([*SIM, "federation.num_hospitals=1000", "federation.partitioning=iid", "data.num_patients=2000"],
     ["federation.num_hospitals", "silo of 2 patients"]),
    ([*SIM, "federation.min_train_nodes=5"], ["federation.min_train_nodes"]),
    ([*SIM, "federation.strategy=foo"], ["federation.strategy"]),
    ([*SIM, "federation.partitioning=foo"], ["federation.partitioning"]),
    ([*SIM, "data.image_size=8"], ["data.image_size", ">= 16"]),
    ([*SIM, "data.image_size=2"], ["data.image_size", ">= 4"]),
    ([*SIM, "data.image_size=18"], ["data.image_size", "divisible"]),
    ([*SIM, "data.heldout_fraction=1.5"], ["data.heldout_fraction"]),
    ([*SIM, "training.batch_size=5000"], ["training.batch_size", "training images"]),
    ([*SIM, "training.batch_size=0"], ["training.batch_size"]),
    ([*SIM, "training.optimizer=rmsprop"], ["training.optimizer"]),
    ([*SIM, "data.source=xray_magic"], ["data.source", "unknown", "dicom"]),
    ([*SIM, "data=folder"], ["data.path"]),
    ([*SIM, "data=folder", "data.path={world}/no-images"], ["no-images"]),
    # output folders that cannot be written
    ([*SIM, "runs_dir=/proc/fedgen-runs"], ["runs_dir", "/proc"]),
    ([*SIM, "runs_dir={world}/a-file/runs"], ["runs_dir", "a-file"]),
    (["pretrain", *SMALL, "runs_dir=/proc/fedgen-runs"], ["runs_dir"]),
    (["pretrain", *SMALL, "pretrain.epochs=0"], ["pretrain.epochs"]),
    # fedgen attack
    (["attack", "{world}/runs/nope"], ["runs/nope"]),
    (["attack", "{world}/a-file"], ["a-file"]),
    (["attack", "{world}/runs"], ["config.yaml"]),
    (["attack", RUN, "--attacks", "foo"], ["--attacks", "foo", "loss"]),
    (["attack", RUN, "--attacks", "loss,,pia"], ["--attacks"]),
    (["attack", RUN, "--per-hospital", "-5"], ["--per-hospital"]),
    (["attack", RUN, "--per-hospital", "0"], ["--per-hospital"]),
    (["attack", RUN, "--samples", "-1"], ["--samples"]),
    (["attack", RUN, "--batch-size", "0"], ["--batch-size"]),
    (["attack", RUN, "--attacks", "lira", "--references", "0"], ["--references"]),
    (["attack", RUN, "--attacks", "rmia", "--reference-statistic", "rmia"], ["statistic", "single-model"]),
    (["audit-dp", "{world}/runs/nope"], ["runs/nope"]),
    (["audit-dp", RUN, "--canaries", "1"], ["--canaries"]),
    (["audit-dp", RUN, "--hospital", "-1"], ["--hospital"]),
    (["audit-dp", RUN, "--hospital", "7"], ["hospital"]),
    (["attack", "{copy}"], ["records.json", "differ"], _edit_member_hash),
    (["attack", "{copy}"], ["hospital-1/records.json", "missing"], _delete_records),
    (["attack", "{copy}"], ["records.json"], _garble_records),
    # fedgen report
    (["report", "{world}/runs/nope"], ["runs/nope"]),
    (["report", "{world}/runs"], ["neither"]),
    (["report", "{world}/broken-sweep"], ["sweep.json"]),
    # fedgen sweep
    (["sweep", "runs_dir={world}/runs", "sweep.privacy=[nosuch]"], ["nosuch"]),
    (["sweep", "runs_dir={world}/runs", "+sweep.nmae=x"], ["sweep.nmae", "sweep.name"]),
    (["sweep", "runs_dir={world}/runs", "sweep.attack.attacks=[foo]"], ["sweep.attack.attacks"]),
    (["sweep", "runs_dir={world}/runs", "sweep.attack.samples=-1"], ["sweep.attack.samples"]),
    (["sweep", "runs_dir={world}/runs", "sweep.utility.num_samples=2"], ["sweep.utility.num_samples"]),
    (["sweep", "runs_dir=/proc/fedgen-runs", "sweep.privacy=[none]"], ["runs_dir"]),
    (["sweep", "runs_dir={world}/runs", "sweep.privacy=[none]", "federation.num_rounds=0"],
     ["federation.num_rounds"]),
    # fedgen deploy
    (["deploy", "certs", "{world}/certs", "--nodes", "0"], ["--nodes"]),
    (["deploy", "certs", "{world}/a-file/certs", "--nodes", "2"], ["a-file"]),
    (["deploy", "superlink", "--insecure", "--print-only", "--port", "70000"], ["--port"]),
    (["deploy", "register", "{world}/node-9.pub", "--insecure", "--print-only"], ["node-9.pub"]),
    (["deploy", "supernode", "--insecure", "--print-only", "--partition-id", "5", "--num-partitions", "3",
      "--data-dir", "{world}/site"], ["--partition-id"]),
    (["deploy", "supernode", "--insecure", "--print-only", "--partition-id", "0", "--num-partitions", "0",
      "--data-dir", "{world}/site"], ["--num-partitions"]),
    (["deploy", "supernode", "--ca", "{world}/ca.crt", "--key", "{world}/node-0", "--print-only",
      "--partition-id", "0", "--num-partitions", "1", "--data-dir", "{world}/site"], ["ca.crt"]),
    (["deploy", "run", "--insecure", "--print-only", "--min-nodes", "-1"], ["--min-nodes"]),
    (["deploy", "run", "--insecure", "--print-only", "runs_dir=/proc/fedgen-runs"], ["runs_dir"]),
    (["deploy", "run", "--insecure", "--print-only", "runs_dir={world}/runs", "+federation.num_round=3"],
     ["federation.num_round"]),
    # fedgen xrays
    (["xrays", "--size", "8", "--out", "{world}/x.png"], ["--size"]),
    (["xrays", "--out", "/proc/fedgen/x.png"], ["--out"]),
]


def _case_id(case) -> str:
    argv = case[0]
    words = [w for w in argv if not w.startswith(("runs_dir={world}/runs", "name=tiny")) and w not in SMALL]
    return " ".join(w.replace("{world}/", "") for w in words)[:60]


def tree_digest(root: Path) -> dict[str, str]:
    """Every folder and file under root, with each file's sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """runs/tiny: config, records, released pipeline and metrics (test_utility's run), plus a
    ledger and a checkpoint; a regular file; a sweep folder whose sweep.json is damaged."""
    root = tmp_path_factory.mktemp("world")
    run = make_run(root / "runs" / "tiny", TINY)
    run.overrides.write_text(json.dumps(TINY))  # a bad case that slipped through would stop here
    (run.hospital_home(0) / "ledger.json").write_text(json.dumps({"version": 2, "history": []}))
    run.checkpoints.mkdir()
    torch.save({"round": 3, "model": {}, "history": []}, run.checkpoint_path(3))
    (root / "a-file").write_text("not a folder\n")
    (root / "broken-sweep").mkdir()
    (root / "broken-sweep" / "sweep.json").write_text('{"rows": [')
    return root


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, tmp_path, capsys, monkeypatch):
    argv, names = case[0], case[1]
    monkeypatch.chdir(tmp_path)  # a relative default (runs/, xrays.png) lands here, never in the repo
    copy = tmp_path / "copy"
    if len(case) > 2:
        shutil.copytree(world / "runs" / "tiny", copy)
        case[2](copy)
    watched = {"world": world, "copy": copy, "cwd": tmp_path}
    before = {name: tree_digest(path) for name, path in watched.items()}
    capsys.readouterr()
    code = main([a.format(world=world, copy=copy) for a in argv])
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("fedgen: error: ")]
    assert len(errors) == 1, err
    assert len(errors[0]) <= 500
    for name in names:
        assert name in errors[0], errors[0]
    assert {name: tree_digest(path) for name, path in watched.items()} == before
