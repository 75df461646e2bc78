"""An update bundle uploaded in the console (/console/updates, up to 256 MiB) leaves the reserve kept for
new mail free, as a backup upload does: it was written whatever the free space, so on a nearly full disk
it took the reserve and new mail was refused while it arrived. Refused (413) at its headers now, before
a byte is written. The box's data directory is on a small tmpfs (test_restore_upload_attacks.py's)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import httpx

from appliance.disk_full import RESERVE_OCTETS
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.integration.test_restore_upload_attacks import small_disk_box
from tests.integration.test_web_first_run import BOUNDARY, _one_answer
from web.session import SECURE_COOKIE_NAME

__all__ = ["small_disk_box"]  # the fixture, used by name

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _free(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def _post_head(box: BoxHandle, web: httpx.Client, length: int) -> str:
    """An update upload whose headers and CSRF field have arrived, its file still to come; the answer."""
    token = _CSRF.search(web.get("/console/updates").text)
    assert token
    first = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token.group(1)}\r\n'
             f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="bundle"; filename="b.tar"\r\n\r\n').encode()
    cookie = f"{SECURE_COOKIE_NAME}={web.cookies[SECURE_COOKIE_NAME]}"
    raw = socket.create_connection(("127.0.0.1", box.port("https")), timeout=20)
    with box.client_context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"POST /console/updates HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n"
                    f"Cookie: {cookie}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
                    + first)
        return _one_answer(tls)


def test_an_update_that_would_take_the_reserve_is_refused_before_it_is_read(
        small_disk_box: tuple[BoxHandle, Path]) -> None:
    box, mount = small_disk_box
    with admin_console(box) as web:
        with (mount / "filler").open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, _free(mount) - RESERVE_OCTETS - 20 * 2**20)  # 20 MiB above it
        before = _free(mount)
        answer = _post_head(box, web, 30 * 2**20)
        assert answer.startswith("HTTP/1.1 413"), answer[:300]
        assert "MiB stay free for new mail" in answer
        updates = box.data.root / "updates"
        assert not updates.exists() or not list(updates.iterdir())
        assert _free(mount) >= before - 2**20

        # One that fits above the reserve is read as before (and refused as no bundle: it is not one); the
        # refused one holds no share of the free space (it would leave this one no room).
        token = _CSRF.search(web.get("/console/updates").text)
        assert token
        small = web.post("/console/updates", data={"csrf": token.group(1)},
                         files={"bundle": ("b.tar", b"not a bundle" * 100, "application/x-tar")})
        assert small.status_code == 303, small.text[:300]
        assert "Not installed" in web.get("/console/updates").text
