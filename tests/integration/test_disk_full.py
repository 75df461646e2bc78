"""A box whose data disk is full (a small SD card, a backup left beside the mail): each protocol says so in
its own words and the session goes on; nothing half-written is left; once there is room again, mail
flows with no restart. The data directory is on a small tmpfs (root, as `make test` and CI run)."""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import BoxHandle
from tests.support.web import ADMIN_PASSWORD, HOSTNAME, setup_code

PASSWORD = "disk-full-Secret-1"
ALICE = "alice@example.test"


class FullDisk:
    """The data directory's file system, filled up to its last block by one file, and freed again."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    def fill(self) -> None:
        with self.filler.open("ab") as f:
            block = b"\0" * 65536
            try:
                while True:
                    f.write(block)
                    f.flush()
            except OSError:
                pass
            # The last partial block too: byte by byte until nothing fits.
            try:
                while True:
                    os.write(f.fileno(), b"\0")
            except OSError:
                pass
        assert os.statvfs(self.mount).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_box(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[BoxHandle, FullDisk]]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        box = BoxHandle(mount / "data", ca)
        try:
            box.add_user(ALICE, PASSWORD)
            _send(box, "before the disk was full")  # the mailbox and its INBOX exist, as on a box in use
            yield box, FullDisk(mount)
        finally:
            box.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _send(box: BoxHandle, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
        smtp.sendmail("someone@example.org", [ALICE], f"Subject: {subject}\r\n\r\nHello.\r\n".encode())


def _imap(box: BoxHandle) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30)
    imap.login(ALICE, PASSWORD)
    return imap


def _maildir_files(box: BoxHandle) -> list[str]:
    return sorted(str(p.relative_to(box.data.root)) for p in box.data.root.rglob("*")
                  if p.is_file() and p.parent.name in ("new", "cur", "tmp"))


def test_smtp_says_insufficient_storage_and_goes_on(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    files = _maildir_files(box)
    disk.fill()
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        assert smtp.mail("someone@example.org")[0] == 250
        code, text = smtp.rcpt(ALICE)
        if code == 250:  # nothing written before the message: then DATA says it
            code, text = smtp.data(b"Subject: while full\r\n\r\nHello.\r\n")
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        assert smtp.noop()[0] == 250  # the session goes on
    assert _maildir_files(box) == files  # nothing half-written in tmp/, nothing new
    disk.free()
    _send(box, "after the disk was freed")  # no restart needed
    assert len(_maildir_files(box)) == len(files) + 1


def test_submission_to_the_internet_says_insufficient_storage(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """The outbound queue's spool is on the same disk: a user's message for another domain is refused
    the same way, so the mail program keeps it and tries again."""
    box, disk = full_box
    with smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30) as smtp:
        smtp.starttls(context=box.client_context)
        smtp.login(ALICE, PASSWORD)
        disk.fill()
        try:
            assert smtp.mail(ALICE)[0] == 250
            code, text = smtp.rcpt("bob@example.org")
            if code == 250:
                code, text = smtp.data(f"From: {ALICE}\r\nSubject: out\r\n\r\nHello.\r\n".encode())
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            assert smtp.noop()[0] == 250
        finally:
            disk.free()


def test_imap_says_overquota_and_goes_on(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    imap = _imap(box)
    files = _maildir_files(box)
    disk.fill()
    try:
        status, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\n" + b"x" * 100_000 + b"\r\n")
        assert (status, data) == ("NO", [b"[OVERQUOTA] Not enough disk space"])
        assert imap.noop()[0] in ("OK", "NO")  # not BYE: the session goes on
        assert _maildir_files(box) == files
    finally:
        disk.free()
    status, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\nNow there is room.\r\n")
    assert status == "OK", data
    assert imap.select("INBOX") == ("OK", [b"2"])
    imap.logout()


def test_pop3_says_sys_temp(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    disk.fill()
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=30)
    try:
        pop.user(ALICE)
        try:
            reply = pop.pass_(PASSWORD)
        except poplib.error_proto as exc:
            reply = exc.args[0]
        if reply.startswith(b"-ERR"):  # opening the maildrop wrote to the database
            assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
            assert pop.user(ALICE).startswith(b"+OK")  # the session goes on
        else:
            assert pop.stat()[0] == 1
            pop.retr(1)
            assert pop.noop().startswith(b"+OK")
    finally:
        pop.quit()
        disk.free()


def test_web_console_says_the_disk_is_full(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    with httpx.Client(base_url=f"https://127.0.0.1:{box.port('https')}", verify=box.client_context,
                      timeout=30) as web:
        assert web.get("/setup/1").status_code == 200  # makes the setup code
        code = setup_code(box.data.root)

        def step1() -> httpx.Response:
            form = web.get("/setup/1")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert form.status_code == 200, form.text[:300]
            assert token, form.text[:300]
            return web.post("/setup/1", data={"csrf": token.group(1), "code": code, "name": "admin",
                                              "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD,
                                              "hostname": HOSTNAME})

        disk.fill()
        try:
            refused = step1()
        finally:
            disk.free()
        assert refused.status_code == 507, refused.text[:300]
        assert "disk is full" in refused.text
        assert step1().status_code == 303  # room again: the wizard goes on
