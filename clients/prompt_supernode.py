"""flower-supernode, asking the SuperLink for work every `POLL_SECONDS` instead of every 3 s.

Flower 1.41's SuperNode loop (`flwr/supernode/start_client_internal.py`) sleeps a fixed 3 s each
time the SuperLink has no message for it, and 0.5 s between checks for its ClientApp's reply;
neither is a setting. A round hands every hospital two messages (train, then evaluate), and each
is found 1.5 s late on average: on quiet cores that made a deployed round 2.9x its simulated twin
(`benchmarks/deploy_overhead.py`). This runs Flower's own `flower_supernode()` with those sleeps
capped at `POLL_SECONDS`, nothing else changed (the same idea as `server/grid.py` on the
coordinator's side). A poll is one small authenticated request; 5 a second is nothing to a
SuperLink. A message found while its objects are still being uploaded has them asked for again
after `server.grid.FIRST_RETRY` s, not Flower's 1 s (`server.grid.prompt_object_pulls`). Should
Flower's module stop matching, the SuperNode runs unpatched, with a warning.
"""

from __future__ import annotations

import sys
import time
import types
import warnings

from server.grid import prompt_object_pulls

POLL_SECONDS = 0.2


def _capped_sleep(seconds: float) -> None:
    time.sleep(min(seconds, POLL_SECONDS))


def shorten_polls() -> bool:
    """Cap the sleeps of Flower's SuperNode loop; False (and a warning) if it cannot."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        warnings.warn("flwr.supernode.start_client_internal changed: the SuperNode polls at Flower's pace", stacklevel=2)
        return False
    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    loop.time = types.SimpleNamespace(**{**clock, "sleep": _capped_sleep})  # type: ignore[assignment]
    return prompt_object_pulls(loop)


def main() -> None:
    shorten_polls()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
