"""A whole-box restore from the web whose restored data does not start (issue 14): `letterbox serve`
switches over, the restored box fails to come up, and the old data comes back and serves again,
unchanged; nothing of the failed restore is left beside the data directory."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import ServedBox
from tests.support.other_box import other_box_backup
from tests.support.polling import wait_until
from tests.support.web import setup_code

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def broken_backup(tmp_path: Path) -> tuple[Path, str]:
    """A valid, verifiable backup of a box whose data cannot start: its SRS secret is too short (the
    box refuses to guess a new one, since addresses in flight depend on it)."""
    return other_box_backup(tmp_path, "broken", lambda layout: (layout.root / "srs.secret").write_text("short\n"))


def domains(box: ServedBox) -> list[str]:
    return box.cli("domain", "list").stdout.split()


def readies(box: ServedBox) -> int:
    return box.log_path.read_bytes().count(b"\nready\n")


def test_old_data_comes_back_when_the_restored_box_does_not_start(tmp_path: Path, ca: trustme.CA) -> None:
    file, kit = broken_backup(tmp_path)
    box = ServedBox(tmp_path / "box", ca)
    box.start()
    try:
        box.cli("domain", "add", "kept.test")
        code = setup_code(box.data.root)
        before = sorted(p.name for p in box.data.root.parent.iterdir())
        with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context,
                          timeout=60) as client:
            page = client.get("/setup/restore")
            assert page.status_code == 200, page.text
            match = _CSRF.search(page.text)
            assert match
            with file.open("rb") as upload:
                answer = client.post("/setup/restore", data={"csrf": match.group(1), "code": code, "secret": kit},
                                     files={"backup": (file.name, upload, "application/octet-stream")})
            assert answer.status_code in (200, 303), answer.text
        # serve stops, switches over, fails to start the restored data, switches back and serves.
        def up_again() -> bool:
            assert box.proc is not None
            assert box.proc.poll() is None, box.log_path.read_text()
            return readies(box) >= 2

        wait_until(up_again, seconds=120, what="serve up again after the failed restore")
        log = box.log_path.read_text()
        assert "restoring: switching the data directory over" in log
        assert "the restored data did not start; putting the old data back" in log
        assert domains(box) == ["kept.test"]
        assert setup_code(box.data.root) == code
        with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context,
                          timeout=30) as client:
            assert client.get("/setup/restore").status_code == 200
        # Neither the restored data nor its staging directory nor the upload is left beside the box.
        assert sorted(p.name for p in box.data.root.parent.iterdir()) == before
    finally:
        assert box.stop() == 0
