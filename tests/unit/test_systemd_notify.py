"""sd_notify(3) to a real datagram socket, as systemd listens for a Type=notify unit."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from appliance import systemd_notify


def test_notify_sends_the_state_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        monkeypatch.setenv(systemd_notify.SOCKET_ENV, str(path))
        assert systemd_notify.notify("READY=1\nSTATUS=serving")
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"letterbox-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        monkeypatch.setenv(systemd_notify.SOCKET_ENV, "@" + name)
        assert systemd_notify.notify("STOPPING=1")
        assert manager.recv(4096) == b"STOPPING=1"


def test_without_a_manager_nothing_happens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(systemd_notify.SOCKET_ENV, raising=False)
    assert not systemd_notify.notify("READY=1")
    # A socket that went away is logged, never fatal.
    monkeypatch.setenv(systemd_notify.SOCKET_ENV, str(tmp_path / "gone"))
    assert not systemd_notify.notify("READY=1")
