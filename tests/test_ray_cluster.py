"""A simulation on an existing Ray cluster (README, "A large simulation on a multi-node Ray
cluster"): `fedgen simulate` with RAY_ADDRESS joins the cluster started with `ray start --head`
instead of starting a private one. Here the cluster is one local head node; more nodes join it
with `ray start --address`."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedgen.running.processes import ProcessGroup, alive, free_port, tagged

BIN = Path(sys.executable).parent


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on {port} within {timeout:.0f} s")


@pytest.mark.slow
def test_simulation_joins_an_existing_ray_cluster(tmp_path):
    ray_dir = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))  # short: Ray puts unix sockets there
    port = free_port()
    cluster = ProcessGroup(dict(os.environ))  # Ray daemonizes: the tag finds all of them at the end
    try:
        head = cluster.start(
            [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
             "--temp-dir", str(ray_dir), "--include-dashboard", "false", "--disable-usage-stats"],
            log_path=tmp_path / "ray.log",
        )
        wait_for_port(port, head)
        logs = ray_dir / "session_latest" / "logs"
        assert not list(logs.glob("python-core-driver-*"))  # no driver has joined yet
        overrides = [f"runs_dir={tmp_path}", "name=ray", "federation.num_hospitals=2", "federation.num_rounds=1",
                     "federation.local_epochs=1", "federation.num_samples=4", "federation.sampling_steps=5", "data.num_patients=48",
                     "data.image_size=16", "training.batch_size=16", "model.init=null"]
        done = subprocess.run([str(BIN / "fedgen"), "simulate", *overrides], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "ray.log").read_text()
        assert "round 1/1" in done.stdout and "2/2 hospitals ok" in done.stdout
        # Flower's simulation process joined our cluster as a driver; its ClientApp actors ran as
        # this cluster's workers.
        assert list(logs.glob("python-core-driver-*")), sorted(p.name for p in logs.iterdir())
        assert list(logs.glob("python-core-worker-*"))
    finally:
        cluster.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert [pid for pid in tagged(cluster.tag) if alive(pid)] == []
