"""The console's Updates page and `letterbox update`: the running version (also under every console page),
a bundle uploaded (admin only, CSRF, checked: format, checksums, a newer version) and handed to
letterbox-update as DATA/updates/incoming.tar with its event, and the last update's outcome."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import bundle, cli
from appliance.update import running_version
from tests.support.releases import build_wheel
from tests.support.umask import umask
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, WebClient, logged_in


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A newer and an older release (the Letterbox wheel only: nothing is installed here)."""
    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for version in ("99.0.0", "0.0.1"):
        wheels = root / version
        build_wheel(wheels, version)
        made[version] = bundle.write_bundle(wheels, root)
    return made


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with logged_in(tmp_path / "data", ADMIN, ADMIN_PASSWORD) as client:
        yield client


def upload(web: WebClient, path: Path, *, csrf: str | None = None, name: str | None = None) -> str:
    token = csrf if csrf is not None else web.csrf("/console/updates")
    response = web.client.post("/console/updates", data={"csrf": token},
                               files={"bundle": (name or path.name, path.read_bytes())}, follow_redirects=True)
    assert response.status_code == 200, response.text[:300]
    return response.text


def updates_dir(web: WebClient) -> Path:
    return web.services.config.data.root / "updates"


def test_the_running_version_is_shown(web: WebClient) -> None:
    page = web.get("/console/updates").text
    assert f'id="running-version">Letterbox {running_version()}<' in page
    assert 'href="/console/updates" class="active">Updates</a>' in page
    assert f'<footer class="version">Letterbox {running_version()}</footer>' in web.get("/console").text


def test_a_newer_bundle_is_handed_to_letterbox_update(web: WebClient, bundles: dict[str, Path]) -> None:
    with umask(0o022):  # (`make run`'s, from the shell): the upload is the box user's alone all the same
        page = upload(web, bundles["99.0.0"])
    assert "Letterbox 99.0.0 is being installed" in page
    assert 'id="update-job"' in page  # the page reloads itself until the outcome is there
    incoming = updates_dir(web) / "incoming.tar"
    assert incoming.read_bytes() == bundles["99.0.0"].read_bytes()
    assert incoming.stat().st_mode & 0o777 == 0o600
    assert updates_dir(web).stat().st_mode & 0o777 == 0o700
    assert [p.name for p in updates_dir(web).iterdir()] == ["incoming.tar"]  # no upload left behind
    events = web.run(web.services.events.recent, 10)
    assert any("Letterbox 99.0.0 uploaded" in str(e) for e in events)


@pytest.mark.parametrize("what", ["garbage", "older", "damaged"])
def test_what_is_not_a_newer_bundle_is_refused(web: WebClient, bundles: dict[str, Path], tmp_path: Path,
                                               what: str) -> None:
    if what == "garbage":
        path, expected = tmp_path / "x.tar", "Not installed: not a Letterbox bundle"
        path.write_bytes(b"not a tar file at all" * 100)
    elif what == "older":
        path, expected = bundles["0.0.1"], f"Not installed: Letterbox 0.0.1 is not newer than the running {running_version()}"
    else:
        # A wheel changed after the bundle was made: its checksum no longer matches.
        path, expected = tmp_path / "damaged.tar", "does not match its checksum"
        with tarfile.open(bundles["99.0.0"]) as src, tarfile.open(path, "w") as dst:
            for member in src:
                f = src.extractfile(member)
                data = f.read() if f else b""
                if member.name.endswith(".whl"):
                    data = data[:-1] + bytes([data[-1] ^ 1])
                dst.addfile(member, io.BytesIO(data))
    page = upload(web, path)
    assert expected in page.replace("&#39;", "'")
    assert not updates_dir(web).exists() or not list(updates_dir(web).iterdir())


def test_upload_needs_the_csrf_token_and_an_admin(web: WebClient, bundles: dict[str, Path]) -> None:
    response = web.client.post("/console/updates", data={"csrf": "forged"},
                               files={"bundle": ("b.tar", bundles["99.0.0"].read_bytes())}, follow_redirects=False)
    assert response.status_code == 403
    assert not updates_dir(web).exists() or not list(updates_dir(web).iterdir())
    web.logout()
    web.login(ALICE, ALICE_PASSWORD)
    assert web.get("/console/updates").status_code == 403


def test_the_last_outcome_is_shown(web: WebClient) -> None:
    updates_dir(web).mkdir()
    (updates_dir(web) / "status.json").write_text(json.dumps({
        "at": 1_800_000_000, "state": "failed", "version": "99.0.0", "previous": "0.1.0",
        "message": "99.0.0 did not come up (the service is failed); rolled back to 0.1.0"}))
    page = web.get("/console/updates").text
    assert 'id="update-last"' in page
    assert "rolled back to 0.1.0" in page
    # The outcome became one event of the box, once however often it is read.
    web.get("/console/updates")
    events = [text for _, kind, text in web.run(web.services.events.recent, 50) if kind == "update"]
    assert events == ["99.0.0 did not come up (the service is failed); rolled back to 0.1.0"]


def test_cli_update_upload_and_status(tmp_path: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert cli.main(["--data", str(data), "domain", "add", "example.org"]) == 0  # the box to upload to
    assert cli.main(["--data", str(data), "update", "upload", str(bundles["99.0.0"])]) == 0
    assert "Letterbox 99.0.0 handed to letterbox-update" in capsys.readouterr().out
    assert (data / "updates" / "incoming.tar").read_bytes() == bundles["99.0.0"].read_bytes()
    assert bundles["99.0.0"].exists()  # copied, not moved: the file given stays where it was
    assert cli.main(["--data", str(data), "update", "status"]) == 0
    out = capsys.readouterr().out
    assert f"running: Letterbox {running_version()}" in out
    assert "waiting: an uploaded bundle" in out
    assert cli.main(["--data", str(data), "update", "upload", str(bundles["0.0.1"])]) == 1
    assert "is not newer than the running" in capsys.readouterr().err
    shutil.rmtree(data)
