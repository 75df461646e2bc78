"""Start-up order (issue 11 item 13, issue 10 item 16): every socket is bound (or its port reserved)
before any serves, so a failed start serves nobody; the signal handlers are in place before anything
opens, so a SIGTERM at any moment of the start ends `letterbox serve` cleanly; `serve` answers with the
web console while the mail services are still starting (issue 15, console first)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from appliance import app
from appliance.config import STANDARD_PORTS, DataLayout, ServeConfig
from tests.conftest import (
    LETTERBOX,
    TEST_HOSTNAME,
    client_context,
    install_test_certificate,
    pick_port_offset,
    preset_settings,
)


def test_a_listener_that_cannot_bind_fails_the_start_before_anyone_is_served(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last listener finds its port taken. Before it fails, it tries every listener bound so far
    # the way a client would: none may answer (old code: SMTP greeted, IMAP took an APPEND).
    answered: dict[str, bytes] = {}
    probed: list[str] = []

    async def serve(services: Any, service: str, host: str, port: int, **_: Any) -> Any:
        for name, (lhost, lport, _serving) in services.listeners().items():
            probed.append(name)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(lhost, lport), 2)
            except (OSError, TimeoutError):
                continue  # refused: not accepting, as it should be
            try:
                answered[name] = await asyncio.wait_for(reader.read(100), 1.0)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setitem(app.LISTENERS, "lmtp", serve)  # lmtp is bound last
    layout = DataLayout(tmp_path / "data")
    layout.create()
    install_test_certificate(ca, layout)
    preset_settings(layout)
    config = ServeConfig(data=layout, listen="127.0.0.1", port_overrides=dict.fromkeys(STANDARD_PORTS, 0),
                         hostname="mail.example.test")

    async def start() -> None:
        await app.Box.start(config)

    with pytest.raises(app.StartupError, match="cannot listen for lmtp"):
        asyncio.run(start())
    assert {"smtp", "imap", "pop3", "https"} <= set(probed)
    assert answered == {}


def _spawn(tmp_path: Path, ca: trustme.CA) -> tuple[subprocess.Popen[bytes], DataLayout]:
    layout = DataLayout(tmp_path / "data")
    if not layout.db.exists():
        layout.create()
        install_test_certificate(ca, layout)
        preset_settings(layout)
    proc = subprocess.Popen(
        [LETTERBOX, "--data", str(layout.root), "serve", "--listen", "127.0.0.1",
         "--port-offset", str(pick_port_offset()), "--hostname", TEST_HOSTNAME],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    return proc, layout


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"letterbox serve did not stop on SIGTERM: {out.decode(errors='replace')}") from None
    return proc.returncode, out.decode(errors="replace")


def _assert_clean(layout: DataLayout) -> None:
    # A clean stop closes the db: SQLite removes its WAL and shared-memory files with the last connection.
    for leftover in (Path(f"{layout.db}-wal"), Path(f"{layout.db}-shm")):
        assert not leftover.exists() or leftover.stat().st_size == 0, f"{leftover.name} left behind"


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.1, 0.3])
def test_sigterm_right_after_spawn_ends_cleanly(tmp_path: Path, ca: trustme.CA, delay: float) -> None:
    proc, layout = _spawn(tmp_path, ca)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert "Traceback" not in out, out
    # Killed by the signal's default action only while Python is still importing, before anything
    # is open; from the handlers on (installed before the db or any socket), a clean exit 0.
    assert code in (0, -signal.SIGTERM), out
    if code != 0:
        assert "listening" not in out, out
        assert "data in" not in out, out
    _assert_clean(layout)


def test_sigterm_while_the_listeners_open_stops_cleanly_and_the_box_starts_again(
    tmp_path: Path, ca: trustme.CA
) -> None:
    proc, layout = _spawn(tmp_path, ca)
    assert proc.stdout is not None
    seen = b""
    for line in proc.stdout:  # the first listener is open: SIGTERM at once
        seen += line
        if b"listening: " in line:
            proc.send_signal(signal.SIGTERM)
            break
    code, out = _finish(proc)
    out = seen.decode(errors="replace") + out
    assert code == 0, out
    assert "Traceback" not in out, out
    _assert_clean(layout)
    proc, layout = _spawn(tmp_path, ca)  # the same data directory starts and serves again
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == b"ready":
            break
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 0, out


def test_serve_raises_the_open_files_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        app.raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == min(app.OPEN_FILES_WANTED, hard) or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


def test_port_free_after_a_failed_start(tmp_path: Path, ca: trustme.CA) -> None:
    # A real busy port: serve exits with one line and non-zero, having served nobody.
    offset = pick_port_offset()
    with socket.socket() as busy:
        # As the box binds: a TIME_WAIT left on the port by an earlier test's box must not fail this bind,
        # and a listening socket keeps the box's bind failing all the same.
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", STANDARD_PORTS["https"] + offset))
        busy.listen()
        layout = DataLayout(tmp_path / "data")
        layout.create()
        install_test_certificate(ca, layout)
        preset_settings(layout)
        result = subprocess.run(
            [LETTERBOX, "--data", str(layout.root), "serve", "--listen", "127.0.0.1",
             "--port-offset", str(offset), "--hostname", TEST_HOSTNAME],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert "cannot listen for https" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with socket.socket() as again:  # the listeners bound before it were closed
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", STANDARD_PORTS["smtp"] + offset))


def _box_config(tmp_path: Path, ca: trustme.CA, **ports: Any) -> ServeConfig:
    layout = DataLayout(tmp_path / "data")
    layout.create()
    install_test_certificate(ca, layout)
    preset_settings(layout)
    return ServeConfig(data=layout, listen="127.0.0.1", hostname=TEST_HOSTNAME, **ports)


async def _until(condition: Any, what: str) -> None:
    """Deadline polling: a loaded machine makes the start slow, never wrong."""
    deadline = asyncio.get_running_loop().time() + 60
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_the_console_answers_while_the_mail_services_are_still_starting(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serve` in this process, its first background service held by the test: the mail services' start
    # stops there. Meanwhile the wizard answers over HTTPS, the SMTP port is held (a second box could not
    # take it) but refuses connections, and the box is not "ready". Released, it finishes and greets.
    config = _box_config(tmp_path, ca, port_offset=pick_port_offset())
    lines: list[str] = []

    class Held:
        async def stop(self) -> None:
            pass

    async def scenario() -> None:
        held, release = asyncio.Event(), asyncio.Event()

        async def hold(_services: Any) -> Held:
            held.set()
            await release.wait()
            return Held()

        monkeypatch.setattr(app, "BACKGROUND", [hold, *app.BACKGROUND])
        serving = asyncio.create_task(app.serve_forever(config, announce=lines.append))
        await _until(held.is_set, "the mail services' start")
        async with httpx.AsyncClient(verify=client_context(ca), timeout=60) as client:
            wizard = await client.get(f"https://{TEST_HOSTNAME}:{config.port('https')}/setup/1")
        assert wizard.status_code == 200
        assert any(line.startswith("First-run setup code: ") for line in lines)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", config.port("smtp"))
        with socket.socket() as rival, pytest.raises(OSError) as taken:
            rival.bind(("127.0.0.1", config.port("smtp")))
        assert taken.value.errno == errno.EADDRINUSE
        assert "ready" not in lines
        release.set()
        await _until(lambda: "ready" in lines, "ready")
        reader, writer = await asyncio.open_connection("127.0.0.1", config.port("smtp"))
        try:
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"220 ")
        finally:
            writer.close()
        os.kill(os.getpid(), signal.SIGTERM)  # serve_forever's own handler: a clean stop
        await asyncio.wait_for(serving, 30)

    asyncio.run(scenario())
