"""Checks a command makes before it starts any work, so a bad path fails at once and leaves nothing
half-written behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedgen.config import ConfigError


def check_writable(path: str | Path, setting: str) -> None:
    """Refuse an output directory that cannot be created or written. Permissions alone do not
    tell (root may write anywhere, but not under /proc): create and remove an empty probe
    directory in `path` or its nearest existing parent."""
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is under {existing}, a file"
        raise ConfigError(f"{setting}: {target} {where}, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedgen-write-check-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{setting}: cannot create {target}: writing in {existing} fails ({err.strerror})") from err


def check_count(value: int | None, name: str, minimum: int) -> None:
    """A count from the command line (None: not given)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
