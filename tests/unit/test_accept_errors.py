"""The loop's handler for asyncio's accept failures (appliance/accept_errors.py): one line per
listener per interval, with the count of the failures it did not repeat; anything else as before."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import pytest

from appliance.accept_errors import ACCEPT_OUT_OF_RESOURCE, AcceptErrors


def test_one_line_per_listener_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    others: list[dict[str, Any]] = []
    handler = AcceptErrors(lambda _loop, context: others.append(context), interval=60, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    one, two = socket.socket(), socket.socket()
    try:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        full = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level(logging.ERROR, "letterbox"):
            for second in range(130):
                now[0] = float(second)
                for sock in (one, two):
                    handler(loop, {"message": ACCEPT_OUT_OF_RESOURCE, "exception": full, "socket": sock})
            handler(loop, {"message": "Task exception was never retrieved"})
        said = [r.getMessage() for r in caplog.records]
        port = one.getsockname()[1]
        mine = [line for line in said if f"127.0.0.1:{port}:" in line]
        assert len(said) == 6
        assert len(mine) == 3  # at 0, 60 and 120 s
        assert "more failed accepts" not in mine[0]
        assert mine[1].endswith("; 59 more failed accepts since the last line")
        assert [c["message"] for c in others] == ["Task exception was never retrieved"]
    finally:
        one.close()
        two.close()
        loop.close()
