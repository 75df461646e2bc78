"""The running version, in a module of its own: `letterbox --version` and every console page's footer
need it, and neither should import the update machinery (appliance/update.py) to get it."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def running_version() -> str:
    """The installed distribution's version (pyproject.toml), or 'unknown' when run from a bare tree.
    Read once: a process keeps running the version it started with, whatever is installed meanwhile."""
    try:
        return metadata.version("letterbox")
    except metadata.PackageNotFoundError:
        return "unknown"
