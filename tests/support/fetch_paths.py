"""Which way the box answered a FETCH of message lists: on the event loop, or through a worker thread."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.imap import fetch_render


def threaded_renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the number of messages of each batch a worker thread renders from the message
    cache (fetch_render._render_cached): empty while every answer comes from the event loop."""
    threaded: list[int] = []
    real = fetch_render._render_cached

    def counted(cache: Any, jobs: list[Any], *args: Any) -> Any:
        threaded.append(len(jobs))
        return real(cache, jobs, *args)

    monkeypatch.setattr(fetch_render, "_render_cached", counted)
    return threaded
