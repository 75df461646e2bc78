"""Dovecot -> Letterbox -> Dovecot -> Letterbox with one Maildir (issue 17): at every hop each folder
keeps its UIDVALIDITY, each message its UID, flags and keywords, the subscriptions stay, and the POP3
UIDLs are the ones Dovecot gives (its default pop3_uidl_format %08Xu%08Xv). Changes made on one side
(a new message, an expunge, a flag) reach the other with the UIDs that side gave them."""

from __future__ import annotations

import imaplib
import poplib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServedBox
from tests.support.dovecot import PrivateDovecot, private_dovecot

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
DOVE_USER = "alice"
FIRST, SECOND = "alice@example.test", "bob@example.test"
FOLDERS = ("INBOX", "Archive", "Archive/2024")
# Folder -> {message number: flags} as first written on Dovecot.
CONTENT = {
    "INBOX": {1: r"(\Seen)", 2: r"(\Flagged $Work)", 3: "()", 4: r"(\Answered \Seen)"},
    "Archive": {5: r"(\Seen $Old)"},
    "Archive/2024": {6: r"(\Draft)"},
}

State = dict[str, tuple[int, dict[int, tuple[int, frozenset[str]]]]]  # folder -> (UIDVALIDITY, n -> (UID, flags))


def message(n: int) -> bytes:
    return f"From: s{n}@example.org\r\nSubject: trip {n}\r\nMessage-ID: <t{n}@example.org>\r\n\r\nBody {n}.\r\n".encode()


def state(client: imaplib.IMAP4) -> State:
    out: State = {}
    for folder in FOLDERS:
        typ, _ = client.select(f'"{folder}"', readonly=True)
        assert typ == "OK"
        raw_validity = client.untagged_responses["UIDVALIDITY"][0]
        assert isinstance(raw_validity, bytes)
        uidvalidity = int(raw_validity)
        typ, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        messages: dict[int, tuple[int, frozenset[str]]] = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            head, body = item
            n = int(re.search(rb"trip (\d+)", body).group(1))  # type: ignore[union-attr]
            uid = int(re.search(rb"UID (\d+)", head).group(1))  # type: ignore[union-attr]
            flags = frozenset(re.search(rb"FLAGS \((.*?)\)", head).group(1).decode().split()) - {"\\Recent"}  # type: ignore[union-attr]
            messages[n] = (uid, flags)
        out[folder] = (uidvalidity, messages)
        client.close()
    return out


def subscriptions(client: imaplib.IMAP4) -> set[str]:
    typ, listing = client.lsub('""', "*")
    assert typ == "OK"
    return {line.rsplit(b" ", 1)[1].strip(b'"').decode() for line in listing if isinstance(line, bytes)}


def expected_uidls(st: State) -> list[bytes]:
    """Dovecot's default POP3 UIDLs of INBOX: %08Xu%08Xv."""
    uidvalidity, messages = st["INBOX"]
    return sorted(f"{uid:08X}{uidvalidity:08X}".encode() for uid, _ in messages.values())


def letterbox_uidls(served: ServedBox, user: str) -> list[bytes]:
    client = poplib.POP3_SSL("localhost", served.port("pop3s"), context=served.client_context, timeout=30)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        return sorted(line.split()[1] for line in client.uidl()[1])
    finally:
        client.quit()


def maildir_of(served: ServedBox, user: str) -> Path:
    local, domain = user.split("@")
    return served.data.mail / domain / local


def on_dovecot(server: PrivateDovecot) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.port, timeout=30)
    client.login(DOVE_USER, PASSWORD)
    return client


def on_letterbox(served: ServedBox, user: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=30)
    client.login(user, PASSWORD)
    return client


@pytest.fixture
def dovecot() -> Iterator[PrivateDovecot]:
    with private_dovecot({DOVE_USER: PASSWORD}) as server:
        yield server


def test_dovecot_letterbox_dovecot_letterbox(dovecot: PrivateDovecot, served_box: ServedBox) -> None:
    # Hop 1: Dovecot writes the Maildir.
    dovecot.start()
    client = on_dovecot(dovecot)
    for folder in FOLDERS[1:]:
        assert client.create(f'"{folder}"')[0] == "OK"
    for folder, messages in CONTENT.items():
        for n, flags in messages.items():
            assert client.append(f'"{folder}"', flags, None, message(n))[0] == "OK"
    for name in ("INBOX", "Archive/2024"):
        assert client.subscribe(f'"{name}"')[0] == "OK"
    hop1, subs1 = state(client), subscriptions(client)
    client.logout()
    dovecot.stop()
    assert subs1 == {"INBOX", "Archive/2024"}

    # Hop 2: Letterbox serves it as Dovecot did, then changes it.
    served_box.stop()
    served_box.add_user(FIRST, PASSWORD)
    served_box.add_user(SECOND, PASSWORD)
    dovecot.copy_maildir_out(DOVE_USER, maildir_of(served_box, FIRST))
    served_box.start()
    client = on_letterbox(served_box, FIRST)
    assert state(client) == hop1
    assert subscriptions(client) == subs1
    assert letterbox_uidls(served_box, FIRST) == expected_uidls(hop1)
    client.select("INBOX")
    assert client.uid("STORE", str(hop1["INBOX"][1][3][0]), "+FLAGS", r"(\Deleted)")[0] == "OK"
    client.expunge()
    assert client.uid("STORE", str(hop1["INBOX"][1][1][0]), "+FLAGS", "($Later)")[0] == "OK"
    client.close()
    # A message that comes and goes before the next one: a stale dovecot-uidlist would give message
    # 7 the UID this one had.
    assert client.append("INBOX", "()", None, message(9))[0] == "OK"
    client.select("INBOX")
    client.uid("STORE", "*", "+FLAGS", r"(\Deleted)")
    client.expunge()
    client.close()
    assert client.append("INBOX", r"(\Flagged)", None, message(7))[0] == "OK"
    assert client.subscribe('"Archive"')[0] == "OK"
    hop2, subs2 = state(client), subscriptions(client)
    client.logout()
    assert 3 not in hop2["INBOX"][1]
    assert hop2["INBOX"][1][7][0] > max(uid for uid, _ in hop1["INBOX"][1].values())
    served_box.stop()  # writes what is pending
    uidlist = (maildir_of(served_box, FIRST) / "dovecot-uidlist").read_text().splitlines()
    uids = [int(line.split()[0]) for line in uidlist[1:]]
    assert uids == sorted(uid for uid, _ in hop2["INBOX"][1].values())
    # Lines appended since the header was written leave its N behind: a reader takes the larger of N
    # and the last UID + 1 (Dovecot's maildir-uidlist.c does; hop 3 shows Dovecot going on from it).
    header = {field[0]: field[1:] for field in uidlist[0].split()[1:]}
    assert uidlist[0].startswith("3 ")
    assert int(header["V"]) == hop2["INBOX"][0]
    assert max(int(header["N"]), uids[-1] + 1) == hop2["INBOX"][1][7][0] + 1

    # Hop 3: Dovecot takes it back: same UIDVALIDITYs, UIDs, flags, subscriptions.
    shutil.rmtree(dovecot.maildir(DOVE_USER))
    dovecot.copy_maildir_in(DOVE_USER, maildir_of(served_box, FIRST))
    dovecot.start()
    client = on_dovecot(dovecot)
    assert state(client) == hop2
    assert subscriptions(client) == subs2
    client.select("INBOX")
    assert client.append("INBOX", "($Fresh)", None, message(8))[0] == "OK"
    hop3, subs3 = state(client), subscriptions(client)
    client.logout()
    dovecot.stop()
    assert hop3["INBOX"][1][8][0] > hop2["INBOX"][1][7][0]  # Dovecot went on from our UIDNEXT

    # Hop 4: a Letterbox mailbox that never saw it (another server) takes Dovecot's copy.
    served_box.stop()
    target = maildir_of(served_box, SECOND)
    shutil.rmtree(target, ignore_errors=True)
    dovecot.copy_maildir_out(DOVE_USER, target)
    served_box.start()
    client = on_letterbox(served_box, SECOND)
    assert state(client) == hop3
    assert subscriptions(client) == subs3
    client.logout()
    assert letterbox_uidls(served_box, SECOND) == expected_uidls(hop3)
