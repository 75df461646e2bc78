"""A box whose data disk fills up (a small SD card, a backup left beside the mail). New mail stops first,
while some room is left: SMTP and LMTP senders get 452 4.3.1 and retry, IMAP APPEND gets NO [OVERQUOTA],
and reading and deleting mail still work (they write to the database too), so a user can make room. A
disk filled to the last block (by something else, or during a transaction) is said in each protocol's
words and the session goes on; nothing half-written is left; once there is room again, mail flows with
no restart. The data directory is on a tmpfs (root, as `make test` and CI run)."""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from appliance.disk_full import RESERVE_OCTETS
from appliance.status_checks import check_disk, save
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.support.imap_wire import RawImap
from tests.support.polling import wait_until
from tests.support.web import ADMIN_PASSWORD, HOSTNAME, setup_code

PASSWORD = "disk-full-Secret-1"
ALICE = "alice@example.test"
DISK_OCTETS = RESERVE_OCTETS + 64 * 2**20  # room for the box and its first mail above the reserve
NEARLY_FULL = 16 * 2**20  # free: under the reserve, plenty for the database's writes


class FullDisk:
    """The data directory's file system, filled by one file (to the last block, or leaving some room)
    and freed again."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    def free_octets(self) -> int:
        stat = os.statvfs(self.mount)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> None:
        with self.filler.open("ab") as f:
            try:
                while (left := self.free_octets() - leave) > 0:
                    f.write(b"\0" * min(left, 1 << 20))
                    f.flush()
                # The last partial page too: byte by byte until nothing fits.
                while not leave:
                    os.write(f.fileno(), b"\0")
            except OSError:
                pass
        if not leave:
            assert self.free_octets() == 0
        else:
            assert leave - (1 << 20) <= self.free_octets() <= leave, self.free_octets()

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_box(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[BoxHandle, FullDisk]]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_OCTETS},mode=0755", "tmpfs", str(mount)],
                   check=True)
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


def test_smtp_refuses_new_mail_while_the_disk_is_nearly_full(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    files = _maildir_files(box)
    disk.fill(leave=NEARLY_FULL)
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        code, text = smtp.mail("someone@example.org")
        assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        assert smtp.noop()[0] == 250  # the session goes on
        disk.free()
        assert smtp.mail("someone@example.org")[0] == 250  # room again: no restart needed
        assert smtp.rcpt(ALICE)[0] == 250
        assert smtp.data(b"Subject: after the disk was freed\r\n\r\nHello.\r\n")[0] == 250
    assert len(_maildir_files(box)) == len(files) + 1


def test_status_page_says_new_mail_is_refused(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    disk.fill(leave=NEARLY_FULL)
    try:
        item = box.run(check_disk(box.services))
    finally:
        disk.free()
    assert item.level == "fail"
    assert "New mail is refused" in item.summary, item.summary
    assert box.run(check_disk(box.services)).level == "ok"


def test_status_page_shows_the_disk_as_it_is_now(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """The checklist runs every 6 hours: a disk that filled since its last run showed its old green on the
    status page while new mail was already refused."""
    box, disk = full_box
    box.run(save(box.services.db, [box.run(check_disk(box.services))]))  # the last run: all fine
    with admin_console(box) as web:
        assert "New mail is refused" not in web.get("/console").text
        disk.fill(leave=NEARLY_FULL)
        try:
            page = web.get("/console").text
        finally:
            disk.free()
    disk_item = page.split('id="check-disk"')[1].split("</li>")[0]
    assert "problem" in disk_item
    assert "New mail is refused" in disk_item


def test_smtp_disk_filled_during_the_transaction(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """Room at MAIL FROM, none left by DATA (another writer filled it): the message is refused, and
    nothing of it is left in tmp/ or new/."""
    box, disk = full_box
    files = _maildir_files(box)
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
        smtp.ehlo("sender.example.org")
        assert smtp.mail("someone@example.org")[0] == 250
        assert smtp.rcpt(ALICE)[0] == 250
        disk.fill()
        try:
            code, text = smtp.data(b"Subject: while full\r\n\r\n" + b"x" * 998 + b"\r\n" * 100)
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            assert smtp.noop()[0] == 250
        finally:
            disk.free()
    assert _maildir_files(box) == files


def test_a_large_message_stops_spooling_at_the_reserve(full_box: tuple[BoxHandle, FullDisk],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Past message_spool.SPOOL_AFTER_OCTETS a message goes to <data>/tmp as it comes: with room at MAIL
    FROM for 3 MiB above the reserve, an 8 MiB message stops being spooled when the next piece would
    take the reserve, is refused after its dot, and its spool file is gone."""
    box, disk = full_box
    files = _maildir_files(box)
    disk.fill(leave=RESERVE_OCTETS + 3 * 2**20)
    lowest = [disk.free_octets()]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], disk.free_octets())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
            smtp.ehlo("sender.example.org")
            assert smtp.mail("someone@example.org")[0] == 250
            assert smtp.rcpt(ALICE)[0] == 250
            code, text = smtp.data(b"Subject: large\r\n\r\n" + (b"x" * 98 + b"\r\n") * 80_000)
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            assert smtp.noop()[0] == 250
    finally:
        done.set()
        watcher.join()
        free_after = disk.free_octets()
        disk.free()
    assert "DATA refused while spooling: the disk is nearly full" in caplog.text
    assert lowest[0] >= RESERVE_OCTETS - 2**20, (lowest[0], RESERVE_OCTETS)  # a piece at most past it
    assert free_after >= RESERVE_OCTETS + 2 * 2**20  # the spool file's octets given back
    assert _maildir_files(box) == files
    assert box.services.message_memory.others() == 0


def test_submission_disk_filled_during_the_transaction(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """The outbound queue's spool is on the same disk: a user's message for another domain is refused
    the same way, so the mail program keeps it and tries again."""
    box, disk = full_box
    with smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30) as smtp:
        smtp.starttls(context=box.client_context)
        smtp.login(ALICE, PASSWORD)
        assert smtp.mail(ALICE)[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        disk.fill()
        try:
            code, text = smtp.data(f"From: {ALICE}\r\nSubject: out\r\n\r\nHello.\r\n".encode())
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            assert smtp.noop()[0] == 250
        finally:
            disk.free()


def test_imap_nearly_full_refuses_append_and_still_reads_and_deletes(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    imap = _imap(box)
    raw = RawImap(box.port("imaps"), box.client_context)
    raw.login(ALICE, PASSWORD)
    disk.fill(leave=NEARLY_FULL)
    try:
        status, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\nHello.\r\n")
        assert (status, data) == ("NO", [b"[OVERQUOTA] Not enough disk space"])
        # Refused before the message is sent: no "+" for its literal, and the session goes on.
        raw.send(b"a1 APPEND INBOX {30000000}\r\n")
        assert raw.line() == b"a1 NO [OVERQUOTA] Not enough disk space\r\n"
        assert raw.command(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
        raw.close()
        assert imap.select("INBOX") == ("OK", [b"1"])
        assert imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[0] == "OK"
        assert imap.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"  # a user can make room
        assert imap.expunge()[0] == "OK"
        assert imap.select("INBOX") == ("OK", [b"0"])
    finally:
        disk.free()
    imap.logout()


def test_a_spooled_append_the_disk_fills_under_is_refused_and_the_session_goes_on(
        full_box: tuple[BoxHandle, FullDisk], caplog: pytest.LogCaptureFixture) -> None:
    """An APPEND past its first 256 KiB is spooled to <data>/tmp as it comes: the disk filled by
    something else meanwhile, the next piece would take the reserve; the message is read to its end,
    refused NO [OVERQUOTA], its spool file gone, and the session goes on."""
    box, disk = full_box
    files = _maildir_files(box)
    budget = box.services.message_memory
    size = 4 * 2**20
    client = RawImap(box.port("imaps"), box.client_context, timeout=30)
    try:
        client.login(ALICE, PASSWORD)
        client.send(b"a1 APPEND INBOX {%d}\r\n" % size)
        assert client.line() == b"+ Ready for literal data\r\n"
        client.send(b"x" * 2**20)
        wait_until(lambda: budget.spooled >= 2**19, seconds=10, what="the message spooled")
        disk.fill(leave=NEARLY_FULL)
        client.send(b"x" * (size - 2**20 - 2) + b"\r\n" + b"\r\n")
        assert client.until_tagged(b"a1")[-1] == b"a1 NO [OVERQUOTA] Not enough disk space\r\n"
        assert client.command(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    finally:
        client.close()
        disk.free()
    assert "APPEND refused while spooling: the disk is nearly full" in caplog.text
    wait_until(lambda: budget.held == budget.spooled == budget.coming == budget.read_back == 0,
               seconds=10, what="the budget given back")
    assert os.listdir(box.data.tmp) == []
    assert _maildir_files(box) == files


def test_concurrent_appends_together_keep_the_reserve(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """Four mail programs each announce a 15 MiB APPEND at once, with room for two above the reserve:
    two are told to send (the messages being received count against the room), the others NO
    [OVERQUOTA] before sending, and an SMTP sender meanwhile 452 4.3.1. Before, each saw the disk's room with nothing of the others written
    yet, all four were taken, and the disk went 20 MiB below the reserve kept for reading and deleting."""
    box, disk = full_box
    size = 15 * 2**20
    clients = [RawImap(box.port("imaps"), box.client_context) for _ in range(4)]
    try:
        for client in clients:
            client.login(ALICE, PASSWORD)
        disk.fill(leave=RESERVE_OCTETS + 2 * size + 2**20 + 2**19)  # two and a half MiB spare
        answers = []
        for n, client in enumerate(clients):
            client.send(b"a%d APPEND INBOX {%d}\r\n" % (n, size))
            answers.append(client.line())
        assert answers[:2] == [b"+ Ready for literal data\r\n"] * 2, answers
        assert answers[2:] == [b"a2 NO [OVERQUOTA] Not enough disk space\r\n",
                               b"a3 NO [OVERQUOTA] Not enough disk space\r\n"], answers
        # A sender over SMTP meanwhile: the two messages on their way leave no room for its 5 MiB.
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as smtp:
            smtp.ehlo("sender.example.org")
            code, text = smtp.mail("someone@example.org", [f"SIZE={5 * 2**20}"])
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        for n, client in enumerate(clients[:2]):
            client.send(b"x" * (size - 2) + b"\r\n" + b"\r\n")
            assert client.until_tagged(b"a%d" % n)[-1].startswith(b"a%d OK" % n)
        assert disk.free_octets() >= RESERVE_OCTETS
    finally:
        for client in clients:
            client.close()
        disk.free()


def test_smtp_data_that_arrived_together_with_others_keeps_the_reserve(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """A sender whose MAIL FROM found room sends 10 MiB while a 15 MiB APPEND is on its way, with room
    for only one of them above the reserve: its DATA gets 452 4.3.1 (it tries again later) and the
    disk keeps its reserve. Before, MAIL FROM's check was the only one: both were written."""
    box, disk = full_box
    size = 15 * 2**20
    imap = RawImap(box.port("imaps"), box.client_context)
    try:
        imap.login(ALICE, PASSWORD)
        disk.fill(leave=RESERVE_OCTETS + size + 5 * 2**20)
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=60) as smtp:
            smtp.ehlo("sender.example.org")
            assert smtp.mail("someone@example.org")[0] == 250
            assert smtp.rcpt(ALICE)[0] == 250
            imap.send(b"a1 APPEND INBOX {%d}\r\n" % size)
            assert imap.line() == b"+ Ready for literal data\r\n"
            code, text = smtp.data(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * (10 * 2**20 // 80))
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
        imap.send(b"x" * (size - 2) + b"\r\n" + b"\r\n")
        assert imap.until_tagged(b"a1")[-1].startswith(b"a1 OK")
        assert disk.free_octets() >= RESERVE_OCTETS
    finally:
        imap.close()
        disk.free()


def test_imap_full_disk_says_overquota_and_goes_on(full_box: tuple[BoxHandle, FullDisk]) -> None:
    box, disk = full_box
    # A file copied in by another program: the box has no cached facts of it yet.
    inbox_new = next(p for p in box.data.root.rglob("new") if p.parent.name != "queue")
    (inbox_new / "1700000000.copied.host").write_bytes(b"Subject: copied in\r\n\r\nHello.\r\n")
    imap = _imap(box)
    assert imap.select("INBOX") == ("OK", [b"2"])
    disk.fill()
    try:
        status, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\n" + b"x" * 100_000 + b"\r\n")
        assert (status, data) == ("NO", [b"[OVERQUOTA] Not enough disk space"])
        # Reading still works: what the message cache would keep of it is computed again next time.
        fetched, parts = imap.fetch("1:2", "(ENVELOPE BODYSTRUCTURE BODY.PEEK[])")
        assert fetched == "OK", parts
        bodies = [part[1] for part in parts if isinstance(part, tuple)]
        assert len(bodies) == 2, parts
        assert b"before the disk was full" in bodies[0]
        assert b"copied in" in bodies[1]
        status, data = imap.store("1", "+FLAGS", "(\\Flagged)")  # the database finds no room
        assert (status, data) == ("NO", [b"[OVERQUOTA] Not enough disk space"])
        # The STORE renamed the file before its row found no room: the next look at the folder finds the
        # flag in the file name and must write it, which the disk refuses. Not the poll's answer: NOOP
        # always succeeds (RFC 3501 6.1.2), CHECK as NOOP (6.4.1); the update is told once it is written.
        assert imap.noop()[0] == "OK"
        assert imap.check()[0] == "OK"
        assert imap.noop()[0] == "OK"
    finally:
        disk.free()
    assert imap.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    status, data = imap.append("INBOX", None, None, b"Subject: appended\r\n\r\nNow there is room.\r\n")
    assert status == "OK", data
    assert imap.select("INBOX") == ("OK", [b"3"])
    imap.logout()


def test_a_store_and_an_expunge_the_full_disk_failed_are_seen_as_the_files_say(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """STORE and EXPUNGE change memory and queue their files and rows with the folder lock let go
    (store/index.py commit_pipelined). Their transactions fail on the full disk: each is answered
    NO, and the folder is read again from the db and the disk. The unlink and the rename were made
    first (files, then the db), so once there is room every session sees the expunge and the flag
    the files say, and the rows say the same."""
    box, disk = full_box
    _send(box, "second")
    busy, other = _imap(box), _imap(box)
    for imap in (busy, other):
        assert imap.select("INBOX") == ("OK", [b"2"])
    assert busy.store("2", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    disk.fill()
    try:
        assert busy.expunge() == ("NO", [b"[OVERQUOTA] Not enough disk space"])
    finally:
        disk.free()
    assert other.noop()[0] == "OK"
    assert other.untagged_responses.get("EXPUNGE") == [b"2"]
    assert busy.noop()[0] == "OK"
    assert busy.untagged_responses.get("EXPUNGE") == [b"2"]
    rows = box.run(box.services.store._db.fetchall("SELECT uid, flags FROM messages ORDER BY uid"))
    assert [(r[0], r[1]) for r in rows] == [(1, "")]

    disk.fill()
    try:
        assert busy.store("1", "+FLAGS", "(\\Flagged)") == ("NO", [b"[OVERQUOTA] Not enough disk space"])
    finally:
        disk.free()
    status, data = other.fetch("1:*", "(UID FLAGS)")
    # (imaplib puts the update the NOOP owed, the same, with the answer)
    assert status == "OK"
    assert set(data) == {b"1 (UID 1 FLAGS (\\Flagged))"}, data
    rows = box.run(box.services.store._db.fetchall("SELECT uid, flags FROM messages ORDER BY uid"))
    assert [(r[0], r[1]) for r in rows] == [(1, "F")]
    assert [Path(f).name.endswith(":2,F") for f in _maildir_files(box)] == [True]
    assert busy.select("INBOX") == ("OK", [b"1"])
    for imap in (busy, other):
        imap.logout()


def test_idle_goes_on_while_its_look_cannot_write(full_box: tuple[BoxHandle, FullDisk]) -> None:
    """A session in IDLE is woken by another session's STORE that the full disk refused after the file
    was renamed: its look finds the flag in the file name and cannot write it. IDLE goes on (no
    tagged NO while the client idles, which would take its DONE for a command), and tells the flag
    once there is room."""
    box, disk = full_box
    busy = _imap(box)
    assert busy.select("INBOX") == ("OK", [b"1"])
    idle = RawImap(box.port("imaps"), box.client_context)
    try:
        idle.login(ALICE, PASSWORD)
        assert idle.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        idle.send(b"i IDLE\r\n")
        assert idle.line() == b"+ idling\r\n"
        disk.fill()
        try:
            assert busy.store("1", "+FLAGS", "(\\Flagged)") == ("NO", [b"[OVERQUOTA] Not enough disk space"])
            time.sleep(1)  # (the idling session's look, woken by the change)
        finally:
            disk.free()
        idle.send(b"DONE\r\n")
        answer = idle.until_tagged(b"i")
        assert answer[-1].startswith(b"i OK IDLE terminated"), answer
        assert any(b"\\Flagged" in line for line in answer), answer
    finally:
        idle.close()
    busy.logout()


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


def test_the_disk_chart_samples_what_df_calls_used(box: BoxHandle) -> None:
    """The daily sample was total - available, root's reserved blocks counted as used: on this project's
    VM (150 GiB reserved) the chart showed 175 GiB beside a Disk item saying 24 % used (df: 25 GiB)."""
    box.run(check_disk(box.services))
    [row] = box.run(box.services.db.fetchall("SELECT used, total FROM disk_samples"))
    usage = shutil.disk_usage(box.data.root)
    assert abs(int(row["used"]) - usage.used) < 64 * 2**20, (int(row["used"]), usage)
    assert int(row["total"]) == usage.total
