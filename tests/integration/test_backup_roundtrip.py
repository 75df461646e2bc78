"""Backup -> fresh data directory -> restore (issue 14): files bit-identical, db equal row by row but
for the UIDNEXT bump, the same UIDVALIDITY/UIDs and POP3 UIDLs, no UID reused for mail that arrived
after the backup, and queued outbound mail still delivered."""

from __future__ import annotations

import asyncio
import hashlib
import imaplib
import os
import poplib
import smtplib
import sqlite3
from pathlib import Path

import trustme

from appliance import backup
from appliance.config import DataLayout
from appliance.dkim_keys import ensure_key
from appliance.queue.smarthost import Smarthost
from tests.conftest import BoxHandle
from tests.support.dns_server import ZoneServer
from tests.support.polling import wait_until
from tests.support.receivers import Receiver, free_port

PASSWORD = "correct horse battery staple 9"
ALICE, BOB, CAROL = "alice@one.test", "bob@one.test", "carol@two.test"
MX = "127.0.0.2"


def message(n: int, to: str = ALICE, sender: str = "someone@far.test") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: message {n}\r\nMessage-ID: <m{n}@far.test>\r\n\r\n"
            f"Body {n}\r\n" + ("x" * 70 + "\r\n") * (n % 30)).encode()


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file a backup carries (not backups/, deleted/, tmp/, the db and its WAL)."""
    out: dict[str, str] = {}
    for top in ("mail", "dkim", "tls", "spool"):
        for dirpath, _dirs, files in os.walk(root / top):
            if Path(dirpath).name == "tmp":
                continue
            for name in files:
                p = Path(dirpath) / name
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    for name in ("srs.secret",):
        if (root / name).exists():
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    return out


def db_rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}  # noqa: S608  table names from sqlite_master
    finally:
        conn.close()


def imap_view(box: BoxHandle, address: str, folder: str = "INBOX") -> tuple[int, list[tuple[int, bytes]]]:
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context) as imap:
        imap.login(address, PASSWORD)
        imap.select(f'"{folder}"', readonly=True)
        validity = int(imap.response("UIDVALIDITY")[1][0])
        _, data = imap.uid("FETCH", "1:*", "(UID FLAGS)")
        view = []
        for item in data:
            if not isinstance(item, bytes):
                continue
            text = item.decode()
            uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
            flags = text.split("FLAGS (")[1].split(")")[0]
            # \Recent belongs to a session (RFC 3501 2.3.2), not to the stored message
            view.append((uid, " ".join(sorted(f for f in flags.split() if f != "\\Recent")).encode()))
        return validity, sorted(view)


def pop3_uidls(box: BoxHandle, address: str) -> list[bytes]:
    client = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context)
    try:
        client.user(address)
        client.pass_(PASSWORD)
        return sorted(line.split()[1] for line in client.uidl()[1])
    finally:
        client.quit()


def populate(box: BoxHandle) -> None:
    for address in (ALICE, BOB, CAROL):
        box.add_user(address, PASSWORD)
    services = box.services
    store = services.store

    async def fill() -> None:
        await services.accounts.add_alias("postmaster@one.test", [ALICE])
        await services.accounts.add_alias("team@two.test", [CAROL, "friend@far.test"])
        for n in range(12):
            await store.deliver([ALICE], message(n))
        for n in range(12, 16):
            await store.deliver([BOB, CAROL], message(n, BOB))
        await store.create_folder(ALICE, "Archive/2024")
        for n in range(16, 20):
            await store.append(ALICE, "Archive/2024", message(n), frozenset({"\\Seen", "$Work"}), None)
        await store.append(ALICE, "Sent", message(20), frozenset({"\\Seen", "\\Answered"}), None)
        await store.store_flags(ALICE, "INBOX", [1, 2, 3], frozenset({"\\Flagged", "$Label1"}), "add")
        await store.store_flags(ALICE, "INBOX", [4], frozenset({"\\Seen"}), "add")
        await ensure_key(services.db, box.data.dkim, "one.test")
        await ensure_key(services.db, box.data.dkim, "two.test")
        await services.settings.save(relay=Smarthost("relay.far.test", 587, "starttls", "me", "relay secret 1"))

    box.run(fill())
    # Outbound mail that waits in the queue (queue_hold is on in test boxes).
    with smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30) as client:
        client.starttls(context=box.client_context)
        client.login(ALICE, PASSWORD)
        client.sendmail(ALICE, ["someone@far.test"], message(99, "someone@far.test", ALICE))
    assert box.run(box.services.db.fetchall("SELECT COUNT(*) FROM queue_messages"))[0][0] == 1


def test_round_trip_to_a_fresh_box(tmp_path: Path, ca: trustme.CA) -> None:
    a = BoxHandle(tmp_path / "a", ca)
    try:
        populate(a)
        imap_before = {addr: imap_view(a, addr) for addr in (ALICE, BOB, CAROL)}
        archive_before = imap_view(a, ALICE, "Archive/2024")
        uidls_before = pop3_uidls(a, ALICE)
        kit = a.run(backup.make_key(a.services.db, a.services.events, "mail.example.test"))
        made = a.run(backup.create(a.services.db, a.services.events, a.data))
        assert made.path.parent == a.data.backups
        assert made.path.name.endswith(".tar.zst.age")
        assert made.manifest["messages"] == 12 + 8 + 5
        files_before = tree_hashes(a.data.root)
        reference = tmp_path / "reference.db"
        sqlite3.connect(a.data.db).execute("VACUUM INTO ?", (str(reference),)).connection.close()
        rows_before = db_rows(reference)
        # Mail after the backup: lost with the box, but its UID may sit in a client's cache.
        after = a.run(a.services.store.deliver([ALICE], message(500)))[ALICE]
        assert isinstance(after, int)
    finally:
        a.close()

    fresh = tmp_path / "b" / "data"
    result = asyncio.run(backup.restore(DataLayout(fresh), made.path, backup.Secret.from_text(kit.text)))
    assert result.kept_aside is None
    assert result.fixes["dropped_rows"] == 0
    assert tree_hashes(fresh) == files_before
    rows_after = db_rows(fresh / "letterbox.db")
    for table, rows in rows_before.items():
        if table == "folders":
            continue
        if table == "delivery_log":
            # Written in batches (appliance's delivery log has no fsync of its own): the row of the mail
            # queued just before the backup may reach the db only after the snapshot. None is invented.
            assert set(rows_after[table]) <= set(rows)
            continue
        if table.startswith("message_text"):
            # The full-text index is written in the background after delivery, so it may move on
            # between the backup's snapshot and this reference; what the backup holds is consistent
            # in itself (rows and each folder's mark in one transaction), checked below.
            continue
        if table == "settings":
            # The backup's own record (backup_last) is written after its snapshot, as its event is.
            assert [r for r in rows_after[table] if r[0] != "backup_last"] == \
                [r for r in rows if r[0] != "backup_last"], table
            continue
        if table == "change_counters":
            # ... and moves the settings' counter, once, after the snapshot.
            counters_before: dict[str, int] = {str(r[0]): int(str(r[1])) for r in rows}
            counters_after: dict[str, int] = {str(r[0]): int(str(r[1])) for r in rows_after[table]}
            assert counters_before.pop("settings") - counters_after.pop("settings") in (0, 1)
            assert counters_after == counters_before, table
            continue
        if table in ("events", "sqlite_sequence"):
            # 'backup made' is recorded after the snapshot; the restore is recorded as an event
            kept = {r for r in rows if table == "events" and not str(r[3]).startswith("backup made")}
            assert kept <= set(rows_after[table])
            continue
        assert rows_after[table] == rows, table
    conn = sqlite3.connect(fresh / "letterbox.db")
    try:
        orphans = conn.execute("SELECT COUNT(*) FROM message_text WHERE NOT EXISTS (SELECT 1 FROM messages m"
                               " WHERE (m.folder_id << 32) | m.uid = message_text.rowid)").fetchone()[0]
    finally:
        conn.close()
    assert orphans == 0  # no text of a message the restored box does not have
    # UID bookkeeping: every folder keeps UIDVALIDITY and moves UIDNEXT up by the margin.
    assert [r[:4] + r[5:] for r in rows_after["folders"]] == [r[:4] + r[5:] for r in rows_before["folders"]]
    assert [r[4] for r in rows_after["folders"]] == [r[4] + backup.UID_MARGIN for r in rows_before["folders"]]  # type: ignore[operator]  # column 4 is UIDNEXT, an int

    restored = BoxHandle(fresh, ca)
    try:
        for addr in (ALICE, BOB, CAROL):
            assert imap_view(restored, addr) == imap_before[addr]
        assert imap_view(restored, ALICE, "Archive/2024") == archive_before
        assert pop3_uidls(restored, ALICE) == uidls_before
        assert restored.run(restored.services.settings.fresh()).relay == Smarthost(
            "relay.far.test", 587, "starttls", "me", "relay secret 1")
        new_uid = restored.run(restored.services.store.deliver([ALICE], message(501)))[ALICE]
        assert isinstance(new_uid, int)
        assert new_uid > after
        deliver_queued(restored, tmp_path)
    finally:
        restored.close()


def deliver_queued(box: BoxHandle, tmp_path: Path) -> None:
    """The message queued on the old box leaves the restored one."""
    zone = ZoneServer(ttl=0)
    zone.start()
    try:
        port = free_port(("127.0.0.1", MX))
        zone.set("far.test", "MX", ["10 mx.far.test."])
        zone.set("mx.far.test", "A", [MX])
        db = box.services.db
        box.run(box.services.settings.save(relay=None))
        for key, value in (("dns_resolver", zone.address), ("outbound_port", str(port)),
                           ("queue_retry_intervals", "1"), ("queue_hold", "0")):
            box.run(db.set_setting(key, value))
        with Receiver(MX, port) as receiver:
            queue = box.services.queue
            assert queue is not None
            box.loop.call_soon_threadsafe(queue.wake)
            [transaction] = receiver.wait(1)
        assert transaction.rcpt_tos == ("someone@far.test",)
        assert b"Subject: message 99" in transaction.data
        wait_until(lambda: not box.run(db.fetchall("SELECT COUNT(*) FROM queue_messages"))[0][0],
                   seconds=20, interval=0.05, what="the queue emptied")
    finally:
        zone.stop()
