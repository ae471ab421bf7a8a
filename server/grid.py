"""The ServerApp's Grid, answering as soon as the replies are in.

Flower 1.41's deployment Grid (`flwr.superlink.grid.http_grid.HttpGrid.send_and_receive`) pushes
a round's messages, then pulls the replies every 3 s (fixed): a round waits up to 3 s after its
last reply, twice a round (train, then evaluate). `PromptGrid` runs the same push-then-pull loop
through the Grid's public `push_messages` / `pull_messages`, polling every `MIN_POLL` seconds at
first and backing off to `MAX_POLL` as the wait grows (a reply waits at most a fortieth of the
time waited so far, or 1 s, to be noticed). Everything else goes to the wrapped Grid unchanged.

A reply's message reaches the SuperLink before its objects (the weights) do, so a prompt pull can
find it half uploaded. Flower then retries each missing object after 1 s, doubling (its
`pull_objects` defaults): a second lost per round on an upload that takes milliseconds.
`prompt_object_pulls` starts those retries at `FIRST_RETRY` instead, doubling to Flower's cap.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Iterable
from logging import DEBUG

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

MIN_POLL = 0.05  # seconds between pulls while a round's replies are coming in
MAX_POLL = 1.0
FIRST_RETRY = 0.05  # seconds before a missing object is asked for again (Flower: 1 s)


def prompt_object_pulls(module) -> bool:
    """Make `module`'s `pull_objects` (Flower's, imported by name) retry a missing object after
    `FIRST_RETRY` s; False (and a warning) where Flower's module no longer matches."""
    from flwr.supercore.inflatable import inflatable_utils

    pull_objects = getattr(module, "pull_objects", None)
    if isinstance(pull_objects, functools.partial):  # patched already
        return True
    if pull_objects is not inflatable_utils.pull_objects:
        warnings.warn(f"{module.__name__} changed: its objects are retried at Flower's pace", stacklevel=2)
        return False
    module.pull_objects = functools.partial(pull_objects, initial_backoff=FIRST_RETRY)
    return True


def poll_interval(waited: float) -> float:
    """Seconds to the next pull after `waited` seconds of waiting."""
    return min(MAX_POLL, max(MIN_POLL, waited / 40))


class PromptGrid(Grid):
    def __init__(self, grid: Grid):
        self.grid = grid
        if type(grid).__name__ == "HttpGrid":  # the deployment's (simulation's Grid pulls no objects)
            prompt_object_pulls(sys.modules[type(grid).__module__])

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull their replies until all are in or `timeout` seconds have
        passed (None: wait for all), as Flower's Grids do."""
        started = time.monotonic()
        pending = set(self.push_messages(messages))
        pushed, sent, pulls, slowest = time.monotonic(), len(pending), 0, 0.0
        replies: list[Message] = []
        while pending:
            pull = time.monotonic()
            received = list(self.pull_messages(pending))  # (Flower's: the replies' objects too)
            replies, pulls, slowest = replies + received, pulls + 1, max(slowest, time.monotonic() - pull)
            pending -= {m.metadata.reply_to_message_id for m in received}
            waited = time.monotonic() - started
            if not pending or (timeout is not None and waited >= timeout):
                break
            pause = poll_interval(waited)
            time.sleep(pause if timeout is None else max(0.0, min(pause, timeout - waited)))
        # For benchmarks/deploy_overhead.py: where the coordinator's side of a round goes.
        log(DEBUG, "fedgen grid: pushed %d messages in %.3f s; %d replies after %.3f s (%d pulls, slowest %.3f s), at %.3f",
            sent, pushed - started, len(replies), time.monotonic() - pushed, pulls, slowest, time.time())
        return replies
