"""Crafted backups uploaded to the web console's restores, over HTTPS.

A backup restored from the web (the wizard's "Restore from a backup") is unpacked beside the data
directory, on the file system the running box keeps its mail on: what it may take is counted before
each file is written, and the reserve kept for new mail (disk_full.RESERVE_OCTETS) stays free. Counted
in octets alone, a backup of many tiny or empty files was charged almost nothing: each 1-octet file
takes a whole block (4 KiB) and each file an inode, and a few hundred KiB of zstd held enough of them
to use up the box's disk or its inodes, so that new mail was refused (452) while the restore ran, and
for good once it failed at ENOSPC. Here the box's data directory is on a small tmpfs (root, as
`make test` and CI run) and the backups are crafted; the restore is refused before the reserve is
reached, and nothing of it is left.

The upload itself leaves the reserve free: it was checked against half the free space, so on a disk
with less than twice the reserve free it took part of the reserve while it arrived and waited.

A backup's manifest is shown for confirmation once uploaded: whatever its fields hold, the page is
shown (it was a 500 with a traceback). A member's name longer than a file system holds is refused at
once: a pax header names a member in up to a MiB, every name is kept until the checksums are compared,
and the files a restore of one mailbox does not write met no file system to refuse them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
import zstandard

from appliance import backup, backup_stream
from appliance.disk_full import RESERVE_OCTETS
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.integration.test_web_first_run import _form_head, _one_answer, _upload_head
from tests.support.other_box import wizard_restore
from tests.support.polling import wait_until
from tests.support.web import setup_code

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DISK_OCTETS = RESERVE_OCTETS + 64 * 2**20  # room for the box and 64 MiB above the reserve
INODES = 40_000
INODE_RESERVE = backup.INODE_RESERVE  # more than a hundredth of INODES
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def small_disk_box(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[BoxHandle, Path]]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_OCTETS},nr_inodes={INODES},mode=0755", "tmpfs",
                    str(mount)], check=True)
    try:
        box = BoxHandle(mount / "data", ca)
        try:
            yield box, mount
        finally:
            box.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _crafted(path: Path, kit: backup.Kit, files: int = 0, size: int = 0, manifest: bytes | None = None,
             name: str = "mail/x.test/a/cur/") -> None:
    """A backup whose manifest is followed by `files` files of `size` octets named `name` and a number
    (no checksum list: the restore must stop long before it)."""
    manifest = manifest or json.dumps({"format": 1, "schema": 7, "host": "x", "mailboxes": []}).encode()
    data = b"x" * size + backup_stream.padding(size)
    with open(path, "wb") as sink, backup._encrypting(sink, kit.recipient, "") as plain:  # noqa: SIM117  one stream layer per line
        with zstandard.ZstdCompressor().stream_writer(plain, closefd=False) as z:
            z.write(backup_stream.header(backup.MANIFEST_NAME, len(manifest)) + manifest
                    + backup_stream.padding(len(manifest)))
            for n in range(files):
                z.write(backup_stream.header(f"{name}{n}", size) + data)
            z.write(backup_stream.END)


class Lowest:
    """The least free space and free inodes the disk had while it was watched."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.octets, self.inodes = self.now()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def now(self) -> tuple[int, int]:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize, st.f_favail

    def _watch(self) -> None:
        while not self._done.is_set():
            octets, inodes = self.now()
            self.octets, self.inodes = min(self.octets, octets), min(self.inodes, inodes)
            time.sleep(0.001)

    def __enter__(self) -> Lowest:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def _restore_in_wizard(box: BoxHandle, file: Path, kit: backup.Kit) -> str:
    """The wizard's Restore from a backup, over HTTPS; the job's error (the restore must fail)."""
    with httpx.Client(base_url=f"https://127.0.0.1:{box.port('https')}", verify=box.client_context,
                      timeout=60) as web:
        job = wizard_restore(web, box.data.root, file, kit.text, seconds=180)
        assert not job["result"], job
        return job["error"]


@pytest.mark.parametrize(("files", "size", "what"), [
    (24_000, 1, "blocks"),  # 24 KB of data, 94 MiB of the disk's blocks
    (36_000, 0, "inodes"),  # no data at all, 36 000 of the disk's 40 000 inodes
])
def test_a_backup_of_many_small_files_is_refused_before_the_reserve(
        small_disk_box: tuple[BoxHandle, Path], tmp_path: Path, files: int, size: int, what: str) -> None:
    box, mount = small_disk_box
    kit = backup.new_kit("x")
    crafted = tmp_path / f"many{backup.SUFFIX}"
    _crafted(crafted, kit, files, size)
    assert crafted.stat().st_size < 2 * 2**20
    beside = sorted(p.name for p in mount.iterdir())
    with Lowest(mount) as lowest:
        error = _restore_in_wizard(box, crafted, kit)
    assert error.startswith("refused: the backup unpacks to more than the free space"), (what, error)
    if what == "blocks":
        assert lowest.octets >= RESERVE_OCTETS, (lowest.octets, RESERVE_OCTETS)
    else:
        assert lowest.inodes >= INODE_RESERVE, lowest.inodes
    # Nothing of it is left beside the data directory (the upload, the staging directory).
    assert sorted(p.name for p in mount.iterdir()) == beside
    assert box.services.backups.staged is None


@pytest.mark.parametrize("manifest", [
    {"format": 1, "schema": 7},  # nothing the page shows
    {"format": 1, "schema": 7, "created": 5, "host": ["h"], "letterbox": None, "domains": 5, "messages": "many",
     "mail_bytes": "lots", "queued": -1, "mailboxes": [1, "a", None, {"address": 3}, {"address": "a@x.test"}]},
    {"format": 1, "schema": 7, "domains": ["x.test", 1], "mailboxes": {"a@x.test": 1}},
])
def test_any_manifest_is_shown_for_confirmation(box: BoxHandle, tmp_path: Path, manifest: dict[str, object],
                                                caplog: pytest.LogCaptureFixture) -> None:
    kit = backup.new_kit("x")
    crafted = tmp_path / f"odd{backup.SUFFIX}"
    _crafted(crafted, kit, manifest=json.dumps(manifest).encode())
    with admin_console(box) as web:
        page = web.get("/console/backups")
        token = _CSRF.search(page.text)
        assert token, page.text[:300]
        with crafted.open("rb") as upload:
            shown = web.post("/console/backups/upload", data={"csrf": token.group(1), "secret": kit.text, "what": "box"},
                             files={"backup": (crafted.name, upload, "application/octet-stream")})
        assert shown.status_code == 200, shown.text[:300]
        assert "Confirm the restore" in shown.text
        assert "<dt>Made</dt><dd>unknown</dd>" in shown.text
        if isinstance(manifest.get("mailboxes"), list):
            assert "<td>a@x.test</td><td>0</td>" in shown.text
        cancel = _CSRF.search(shown.text)
        confirm_token = re.search(r'name="token" value="([^"]+)"', shown.text)
        assert cancel
        assert confirm_token
        answer = web.post("/console/backups/confirm", data={"csrf": cancel.group(1), "token": confirm_token.group(1),
                                                            "confirm": "no"})
        assert answer.status_code == 303
    assert "Traceback" not in caplog.text
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]


@pytest.mark.parametrize("manifest", [
    b'{"format": 1e999, "schema": 7}',  # JSON's infinity: int() raised OverflowError
    b"[" * 200_000,  # nested deeper than json.loads recurses: RecursionError
], ids=["infinity", "nested"])
def test_a_manifest_json_cannot_read_is_refused_as_damaged(box: BoxHandle, tmp_path: Path, manifest: bytes,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Both were a 500 with a traceback on the console's upload (and a job failed with one in the
    wizard's restore): the manifest is the archive's word."""
    kit = backup.new_kit("x")
    crafted = tmp_path / f"damaged{backup.SUFFIX}"
    _crafted(crafted, kit, manifest=manifest)
    with admin_console(box) as web:
        token = _CSRF.search(web.get("/console/backups").text)
        assert token
        with crafted.open("rb") as upload:
            answer = web.post("/console/backups/upload", data={"csrf": token.group(1), "secret": kit.text, "what": "box"},
                              files={"backup": (crafted.name, upload, "application/octet-stream")})
        assert answer.status_code == 303, answer.text[:300]
        assert "the backup&#39;s manifest is damaged" in web.get("/console/backups").text
    assert "Traceback" not in caplog.text
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]


def test_a_name_longer_than_a_file_system_holds_is_refused(box: BoxHandle, tmp_path: Path) -> None:
    """One mailbox put back from an uploaded backup whose other members have names of a MiB: a few
    hundred octets of the upload each, a MiB of the box's memory each until the end (200 MiB here; a
    larger file, the whole memory)."""
    kit = backup.new_kit("x")
    crafted = tmp_path / f"names{backup.SUFFIX}"
    manifest = json.dumps({"format": 1, "schema": 7, "mailboxes": [{"address": "a@x.test"}]}).encode()
    _crafted(crafted, kit, files=200, manifest=manifest, name="other/" + ("y" * 250 + "/") * 4000)
    assert crafted.stat().st_size < 2**20
    with admin_console(box) as web:
        page = web.get("/console/backups")
        token = _CSRF.search(page.text)
        assert token, page.text[:300]
        with crafted.open("rb") as upload:
            shown = web.post("/console/backups/upload", files={"backup": (crafted.name, upload, "application/octet-stream")},
                             data={"csrf": token.group(1), "secret": kit.text, "what": "mailbox", "address": "a@x.test"})
        assert shown.status_code == 200, shown.text[:300]
        confirm = re.search(r'name="token" value="([^"]+)"', shown.text)
        csrf = _CSRF.search(shown.text)
        assert confirm
        assert csrf
        answer = web.post("/console/backups/confirm", data={"csrf": csrf.group(1), "token": confirm.group(1),
                                                            "confirm": "yes"})
        assert answer.status_code == 303

        def finished() -> dict[str, str]:
            job: dict[str, str] | None = web.get("/console/backups/progress").json()["job"]
            return job if job is not None and not job["running"] else {}

        job = wait_until(finished, seconds=120, what="the restore's end")
    assert job["error"].startswith("refused: an entry's name is longer than a file system holds"), job
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name or ".restore-" in p.name]


def test_an_upload_that_would_take_the_reserve_is_refused_before_it_is_read(
        small_disk_box: tuple[BoxHandle, Path]) -> None:
    """80 MiB free, the reserve 54 MiB: an upload of 38 MiB (and room for its unpacked copy, 76 MiB)
    passed, and left 42 MiB free. Refused (413) at its headers now, nothing written."""
    box, mount = small_disk_box
    filler = mount / "filler"
    st = os.statvfs(mount)
    with filler.open("wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 80 * 2**20)
    httpx.get(f"https://localhost:{box.port('https')}/setup/restore", verify=box.client_context)  # makes the code
    head = _form_head(box, setup_code(box.data.root))
    with _upload_head(box, len(head[1]) + 38 * 2**20, head=head) as tls:
        answer = _one_answer(tls)
    assert answer.startswith("HTTP/1.1 413"), answer[:300]
    assert "MiB stay free for new mail" in answer
    assert box.services.backups.arriving == 0
    assert not [p for p in mount.iterdir() if ".upload-" in p.name]
    assert os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize >= 79 * 2**20
