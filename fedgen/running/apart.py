"""Work a launcher hands to a child process, so that the launcher itself stays small.

`fedgen simulate` waits on Flower for the whole run, beside a SuperLink, Ray and its workers.
Planning the silos, checking the ledgers and the base model needs torch, diffusers and Opacus
(about 0.3 GiB that no page of the federation shares): done in the launcher, it held them idle
for the whole run, a tenth of the process tree's memory at 100 hospitals. A child process does
that work and exits before Flower starts (`plan_apart`; in a process that holds torch already, a
sweep or a test, the work runs in place: a child would save nothing there).

The child is a fresh interpreter (`subprocess`, nothing inherited but the environment), not a
`multiprocessing` one: spawning those starts a resource tracker that outlives the work, and
forking a process that has run torch's thread pools can hang. Messages go over a pipe of their
own, so nothing the work prints can mix with them.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def call_apart(function: Callable[..., Any], *args: Any, echo: Callable[[str], Any] = print) -> Any:
    """`function(*args, echo=...)` in a child process: its echoed lines reach `echo` here as they
    come, its result (or its exception, the child's traceback added as a note) comes back.
    `function` and `args` must pickle (a module-level function and plain values)."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", f"from fedgen.running.apart import serve; serve({write_end})"],
        stdin=subprocess.PIPE, pass_fds=(write_end,),
    )
    os.close(write_end)
    messages = Connection(read_end, writable=False)
    answered = False
    try:
        assert child.stdin is not None
        child.stdin.write(pickle.dumps((function, args)))
        child.stdin.close()
        while True:
            try:
                message = messages.recv()
            except EOFError:
                raise RuntimeError(
                    f"a child process of the launcher ended (exit code {child.wait()}) before it answered"
                ) from None
            if message[0] == "line":
                echo(message[1])
                continue
            answered = True
            if message[0] == "result":
                return message[1]
            _, err, trace = message
            err.add_note(f"(in a child process of the launcher)\n{trace}")
            raise err
    finally:
        messages.close()
        if not answered:  # interrupted, or a failure here: the work is not wanted any more
            child.kill()
        child.wait()


def plan_apart(function: Callable[..., Any], *args: Any, echo: Callable[[str], Any] = print) -> Any:
    """`call_apart` where it saves memory: in a child process, unless this process holds torch
    already (a sweep between its runs, a test, a notebook), where a child would only add its
    imports (seconds) and save nothing."""
    if "torch" in sys.modules:
        return function(*args, echo=echo)
    return call_apart(function, *args, echo=echo)


def serve(fd: int) -> None:
    """The child's side: run the pickled call from stdin, send lines and the outcome on `fd`."""
    messages = Connection(fd, readable=False)
    function, args = pickle.loads(sys.stdin.buffer.read())
    try:
        messages.send(("result", function(*args, echo=lambda line="": messages.send(("line", str(line))))))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the launcher
        trace = traceback.format_exc()
        try:
            messages.send(("error", err, trace))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            messages.send(("error", RuntimeError(f"{type(err).__name__}: {err}"), trace))
    messages.close()
