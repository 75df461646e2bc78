"""Maildir interop with Debian's Dovecot, both ways: a Maildir Dovecot wrote is served by `letterbox serve`
with every message, folder and flag, and one Letterbox wrote is read by Dovecot the same way."""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServedBox
from tests.support.dovecot import PrivateDovecot, private_dovecot
from tests.support.imap_wire import RawImap

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
DOVE_USER = "alice"


def message(n: int) -> bytes:
    return (f"From: sender{n}@example.org\r\nTo: {USER}\r\nSubject: interop {n}\r\nMessage-ID: <i{n}@example.org>"
            f"\r\n\r\nBody of message {n}.\r\n").encode()


# (folder, message number, flags) written on one side and expected on the other.
CONTENT = [
    ("INBOX", 1, r"(\Seen)"),
    ("INBOX", 2, r"(\Flagged \Answered)"),
    ("INBOX", 3, "()"),
    ("INBOX", 4, r"(\Seen $Work)"),
    ("Archive", 5, r"(\Seen)"),
    ("Archive/2024", 6, r"(\Draft \Seen)"),
    ("Sent", 7, r"(\Seen)"),
]
FOLDERS = {"INBOX", "Archive", "Archive/2024", "Sent"}


def fill(client: imaplib.IMAP4) -> None:
    for folder in sorted(FOLDERS - {"INBOX"}):
        typ, data = client.create(folder)
        assert typ == "OK" or b"exists" in data[0].lower(), data
    for folder, n, flags in CONTENT:
        typ, data = client.append(folder, flags, None, message(n))
        assert typ == "OK", data


def read_back(client: imaplib.IMAP4) -> tuple[set[str], dict[tuple[str, int], set[str]]]:
    """Folders, and for each (folder, message number) its flags, read over IMAP."""
    typ, listing = client.list()
    assert typ == "OK"
    folders = set()
    for line in listing:
        assert isinstance(line, bytes)
        m = re.match(rb'\((.*?)\) "(.)" (.*)', line)
        assert m, line
        name = m.group(3).strip(b'"').decode()
        if b"\\Noselect" not in m.group(1):
            folders.add(name)
    found: dict[tuple[str, int], set[str]] = {}
    empty: set[str] = set()
    for folder in folders:
        typ, _ = client.select(f'"{folder}"', readonly=True)
        assert typ == "OK"
        typ, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
        if data == [None]:
            empty.add(folder)
            continue
        for item in data:
            if not isinstance(item, tuple):
                continue
            head, body = item
            n = int(re.search(rb"Subject: interop (\d+)", body).group(1))  # type: ignore[union-attr]
            flags = set(re.search(rb"FLAGS \((.*?)\)", head).group(1).decode().split())  # type: ignore[union-attr]
            flags.discard("\\Recent")
            assert body == message(n)
            found[(folder, n)] = flags
    # Letterbox makes the special-use folders (Drafts, Trash, ...) on first use; empty extra
    # folders are fine on either side.
    return {f for f in folders if f not in empty or f in FOLDERS}, found


def subscribed(client: imaplib.IMAP4) -> set[str]:
    typ, listing = client.lsub('""', "*")
    assert typ == "OK"
    return {line.rsplit(b" ", 1)[1].strip(b'"').decode() for line in listing if isinstance(line, bytes)}


def expected() -> dict[tuple[str, int], set[str]]:
    return {(folder, n): set(flags.strip("()").split()) for folder, n, flags in CONTENT}


@pytest.fixture
def dovecot() -> Iterator[PrivateDovecot]:
    with private_dovecot({DOVE_USER: PASSWORD}) as server:
        yield server


def letterbox_maildir(served: ServedBox) -> Path:
    local, domain = USER.split("@")
    return served.data.mail / domain / local


def test_dovecot_maildir_served_by_letterbox(dovecot: PrivateDovecot, served_box: ServedBox) -> None:
    dovecot.start()
    with imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=30) as client:
        client.login(DOVE_USER, PASSWORD)
        fill(client)
        assert client.subscribe('"Archive/2024"')[0] == "OK"
        folders, on_dovecot = read_back(client)
        client.logout()
    assert folders == FOLDERS
    assert on_dovecot == expected()
    dovecot.stop()

    served_box.stop()
    served_box.add_user(USER, PASSWORD)
    dovecot.copy_maildir_out(DOVE_USER, letterbox_maildir(served_box))
    served_box.start()
    with imaplib.IMAP4_SSL("localhost", served_box.port("imaps"), ssl_context=served_box.client_context,
                           timeout=30) as client:
        client.login(USER, PASSWORD)
        folders, on_letterbox = read_back(client)
        # Dovecot's subscriptions file comes along (issue 17): exactly what was subscribed there.
        assert subscribed(client) == {"Archive/2024"}
        client.logout()
    assert folders == FOLDERS
    assert on_letterbox == expected()


def test_letterbox_maildir_read_by_dovecot(dovecot: PrivateDovecot, served_box: ServedBox) -> None:
    served_box.add_user(USER, PASSWORD)
    with imaplib.IMAP4_SSL("localhost", served_box.port("imaps"), ssl_context=served_box.client_context,
                           timeout=30) as client:
        client.login(USER, PASSWORD)
        fill(client)
        assert client.subscribe('"Archive/2024"')[0] == "OK"
        assert client.unsubscribe("Junk")[0] == "OK"
        folders, on_letterbox = read_back(client)
        on_letterbox_subscribed = subscribed(client)
        client.logout()
    assert folders == FOLDERS
    assert on_letterbox == expected()
    # CREATE subscribed nothing (RFC 3501 6.3.6): INBOX, the special folders, and what we subscribed.
    assert on_letterbox_subscribed == {"INBOX", "Sent", "Drafts", "Trash", "Archive", "Archive/2024"}
    served_box.stop()

    dovecot.copy_maildir_in(DOVE_USER, letterbox_maildir(served_box))
    dovecot.start()
    with imaplib.IMAP4("127.0.0.1", dovecot.port, timeout=30) as client:
        client.login(DOVE_USER, PASSWORD)
        folders, on_dovecot = read_back(client)
        assert subscribed(client) == on_letterbox_subscribed  # the mirrored subscriptions file
        client.logout()
    assert folders == FOLDERS
    assert on_dovecot == expected()


# Commands naming messages in an empty selected mailbox. A sequence number names none there (`*`
# neither: RFC 9051 9, the count "in a non-empty mailbox"), and Dovecot answers BAD for every one, `*`
# included; a UID set, SEARCH, SORT and THREAD merely match nothing (OK). Letterbox answered `FETCH *` OK.
EMPTY_MAILBOX_COMMANDS = [
    b"FETCH 1:* (FLAGS)", b"FETCH 1 (FLAGS)", b"FETCH * (FLAGS)", b"FETCH 2:* (FLAGS)",
    b"FETCH 1:* (FLAGS) (CHANGEDSINCE 1)", b"STORE 1:* +FLAGS (\\Seen)", b"STORE 1 +FLAGS (\\Seen)",
    b"STORE * +FLAGS (\\Seen)", b"COPY 1:* INBOX", b"MOVE * INBOX",
    b"SEARCH 1:*", b"SEARCH 1", b"SEARCH *", b"SEARCH UID 1:*", b"SORT (DATE) UTF-8 1:*", b"THREAD REFERENCES UTF-8 1:*",
    b"UID FETCH 1:* (FLAGS)", b"UID FETCH 1 (FLAGS)", b"UID FETCH * (FLAGS)", b"UID STORE 1:* +FLAGS (\\Seen)",
    b"UID SEARCH 1:*", b"UID COPY 1:* INBOX", b"UID MOVE 1:* INBOX", b"UID EXPUNGE 1:*",
]


def tagged_results(raw: RawImap) -> dict[bytes, bytes]:
    """Each EMPTY_MAILBOX_COMMANDS' tagged result (OK, NO or BAD) in a just-selected empty INBOX."""
    try:
        assert raw.command(b"e", b"ENABLE CONDSTORE")[-1].startswith(b"e OK")
        assert raw.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        return {command: raw.command(b"t", command)[-1].split()[1] for command in EMPTY_MAILBOX_COMMANDS}
    finally:
        raw.close()


def test_commands_on_an_empty_mailbox_answer_as_dovecot(dovecot: PrivateDovecot, served_box: ServedBox) -> None:
    served_box.add_user(USER, PASSWORD)
    raw = RawImap(served_box.port("imaps"), served_box.client_context)
    raw.login(USER, PASSWORD)
    ours = tagged_results(raw)
    dovecot.start()
    raw = RawImap(dovecot.port)
    raw.login(DOVE_USER, PASSWORD)
    theirs = tagged_results(raw)
    assert ours == theirs
    assert theirs[b"FETCH 1:* (FLAGS)"] == b"BAD"  # (what Dovecot answers, so a change on its side shows)
    assert theirs[b"UID FETCH 1:* (FLAGS)"] == b"OK"
