"""A warm ClientApp executor for one SuperNode (`flower-supernode --isolation process`).

In its default `subprocess` isolation, Flower 1.41's SuperNode starts `flower-superexec`, which
launches a fresh `flwr-clientapp` process for every message: each one imports flwr, torch and
diffusers, installs the FAB and rebuilds the hospital's silo, which cost far more than a round's
training (issue 18). This process does what `flwr-clientapp` does
(`flwr.supernode.runtime.run_clientapp`) for one task after another: it acquires each task from
the SuperNode's Runtime API (node-local, as Flower's own executor does), pulls the message and
its context, runs the ClientApp, and pushes the reply and the context back. The imports, the
installed FAB and the ClientApp's own caches (the hospital and its silo, `clients.app`) stay
warm between messages. The SuperNode still handles one message at a time, and TLS and node
authentication to the SuperLink are the SuperNode's, unchanged.

What runs is the FAB's code, as with `flwr-clientapp`: this module imports neither `clients`
nor `fedgen` itself, and a task of another FAB (new code from the coordinator) is handed to a
cold `flwr-clientapp` of its own, exactly as Flower would launch it. The ClientApp's module state
lives on between messages and runs, as in a worker of Flower's simulation engine (`clients.app`
keeps only the current run's hospitals; nothing of the DP noise is kept).

    flower-supernode ... --isolation process --port PORT &
    python -m clients.executor --runtime-api-address 127.0.0.1:PORT --parent-pid <its pid> --preload torch
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from logging import ERROR, INFO, WARN
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_config, get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

POLL_SECONDS = 0.1  # between AcquireTask calls while idle (Flower's flower-superexec: 1 s)
# A task is handed out while its SuperNode is still pulling the message's objects from the
# SuperLink. flwr-clientapp retries a missing object after 1, 2, 4, 8 s (PULL_INITIAL_BACKOFF):
# hidden behind a cold process's start, that costs a warm one up to 15 s a message. Retry sooner.
PULL_BACKOFF_SECONDS, PULL_BACKOFF_CAP_SECONDS = 0.02, 0.25


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API (plain HTTP on the node itself, as Flower's own)."""
    interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


class WarmExecutor:
    """Runs the ClientApp of one FAB in this process, task after task."""

    def __init__(self, address: str):
        self.address = address
        self.fab_hash: str | None = None
        self.app: ClientApp | None = None
        self.cold: list[subprocess.Popen] = []

    def run(self, task: Task, token: str) -> None:
        self.cold = [p for p in self.cold if p.poll() is None]
        if self.fab_hash is not None and task.fab_hash and task.fab_hash != self.fab_hash:
            log(INFO, "task %d: another FAB (%s): a cold flwr-clientapp runs it", task.task_id, task.fab_hash[:8])
            self.cold.append(subprocess.Popen(["flwr-clientapp", "--runtime-api-address", self.address,
                                               "--token", token, "--insecure", "--parent-pid", str(os.getpid())]))
            return
        acquired_at = time.time()
        marks = [time.perf_counter()]  # acquired, input pulled, ClientApp done, reply pushed
        client = _client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(lambda: _heartbeat(client))
        heartbeat.start()
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            marks.append(time.perf_counter())
            log(INFO, "task %d: %s message (run %d), acquired at %.3f", task.task_id,
                message.metadata.message_type, run.run_id, acquired_at)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # as flwr-clientapp: the SuperLink gets an error reply
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            marks.append(time.perf_counter())
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:
                log(ERROR, "Failed to push reply message", exc_info=ex)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            marks.append(time.perf_counter())
        # Wall-clock times and phases: benchmarks/deploy_overhead.py places each task in its round.
        phases = [b - a for a, b in zip(marks, marks[1:])]
        log(INFO, "task %d: %s in %.3f s (pull %s s, ClientApp %.3f s, push %.3f s), done at %.3f", task.task_id,
            status, marks[-1] - marks[0], f"{phases[0]:.3f}" if len(phases) == 3 else "-", phases[-2], phases[-1],
            time.time())

    def _app(self, run: Run, fab: Fab) -> ClientApp:
        """The FAB's ClientApp, installed and imported on its first task."""
        if self.app is None:
            install_from_fab(fab.content, skip_prompt=True)
            project = get_project_dir(run.fab_id, run.fab_version, fab.hash_str).resolve()
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            module = str(get_project_config(project)["tool"]["flwr"]["app"]["components"]["clientapp"]).partition(":")[0]
            source = Path(str(getattr(sys.modules.get(module), "__file__", ""))).resolve()
            if not source.is_relative_to(project):
                raise LoadClientAppError(f"the ClientApp {module} was imported from {source}, not from the FAB at {project}")
            self.app, self.fab_hash = app, fab.hash_str
        return self.app


def _heartbeat(client: RuntimeHttpClient) -> bool:
    """The task's heartbeat. (Flower's raises SIGINT when the SuperNode refuses it, which would
    stop this whole process; here the task just ends and its reply is refused.)"""
    try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except httpx.TransportError:
        return False
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
            return False
        raise
    return True


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """`flwr.supernode.runtime.run_clientapp.pull_task_input`, retrying missing objects sooner."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_tries_per_object=None,
        initial_backoff=PULL_BACKOFF_SECONDS, backoff_cap=PULL_BACKOFF_CAP_SECONDS,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--preload", nargs="*", default=[], metavar="MODULE",
                        help="third-party modules the ClientApp needs, imported before the first task "
                        "(never the app's own packages: those come from the FAB)")
    args = parser.parse_args(argv)
    # `python -m clients.executor` has imported the installed `clients` package: forget it, so that
    # loading the ClientApp imports the FAB's `clients` (and `fedgen`), as flwr-clientapp does.
    for name in [m for m in sys.modules if m == "clients" or m.startswith("clients.")]:
        del sys.modules[name]
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    for module in args.preload:
        if module.partition(".")[0] in ("clients", "fedgen"):
            parser.error(f"--preload {module}: the app's own code is the FAB's, imported with it")
        try:
            importlib.import_module(module)
        except ImportError as err:
            log(WARN, "--preload %s: %s", module, err)
    api = _client(args.runtime_api_address, "SuperExec")
    executor = WarmExecutor(args.runtime_api_address)
    log(INFO, "fedgen ClientApp executor: warm, serving %s", args.runtime_api_address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        acquired = api.AcquireTask(request)
        if acquired.HasField("task") and acquired.token:
            executor.run(acquired.task, acquired.token)
        else:
            time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    main()
