"""Starting Flower's processes and making sure every one of them stops.

Flower's process tree is deep and leaky: flower-superlink starts flower-superexec in a session of
its own, which starts flwr-simulation, which starts Ray (gcs_server, raylet, workers re-parented
to init). Killing one process group is not enough. Every process we start carries a tag in its
environment; `ProcessGroup.stop` ends the whole tree, then sweeps anything still carrying the tag.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

TAG_VARIABLE = "FEDGEN_PROCESS_TAG"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, found, stack = _children(), [], [pid]
    while stack:
        for child in kids.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def tagged(tag: str) -> list[int]:
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Make a kill (SIGTERM: a service manager, `timeout`, a closed terminal) unwind this process
    as Ctrl-C does, so that every `ProcessGroup` it started is stopped on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)


def _signal(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class ProcessGroup:
    """Processes started for one job; `stop()` ends all of them and their descendants."""

    def __init__(self, env: dict[str, str]):
        # An inherited tag (a test, a supervisor) lets the caller find everything this job started.
        self.tag = env.get(TAG_VARIABLE) or uuid.uuid4().hex
        self.env = {**env, TAG_VARIABLE: self.tag}
        self.processes: list[subprocess.Popen] = []

    def start(
        self, command: list[str], log_path: Path | None = None, show_output: bool = False, **kwargs
    ) -> subprocess.Popen:
        """Start `command` with its output in `log_path` (or on our terminal with show_output)."""
        stdout = open(log_path, "ab") if log_path else None if show_output else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            command, env=self.env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def stop(self, grace: float = 5.0, crash: bool = False) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after `grace` seconds. `crash=True` sends
        SIGKILL at once, as a power cut would (tests of fault tolerance)."""
        pids: list[int] = []
        for proc in self.processes:
            if proc.poll() is None:
                pids += [proc.pid]
            pids += descendants(proc.pid)
        _signal(pids, signal.SIGKILL if crash else signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in pids + tagged(self.tag)):
            time.sleep(0.1)
        _signal([p for p in pids + tagged(self.tag) if alive(p)], signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self.processes.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_healthy(
    url: str, proc: subprocess.Popen, timeout: float = 60.0, cafile: str | Path | None = None
) -> None:
    """Poll a SuperLink's /health endpoint until it answers 200 (or the process dies).
    An https URL is checked against `cafile` (the federation's CA)."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no answer from {url} after {timeout:.0f} s")
