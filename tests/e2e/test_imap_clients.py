"""`letterbox serve` driven by real IMAP clients: mbsync (isync) syncs a mailbox both ways, mutt reads it."""

from __future__ import annotations

import imaplib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServedBox, require_program

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def message(n: int) -> bytes:
    return (f"From: sender{n}@example.org\r\nTo: {USER}\r\nSubject: sync {n}\r\nMessage-ID: <s{n}@example.org>\r\n"
            f"\r\nBody {n}.\r\n").encode()


@pytest.fixture
def served(served_box: ServedBox) -> ServedBox:
    served_box.add_user(USER, PASSWORD)
    return served_box


def imap(served: ServedBox) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("localhost", served.port("imaps"), ssl_context=served.client_context, timeout=30)
    client.login(USER, PASSWORD)
    return client


def server_state(served: ServedBox) -> dict[str, dict[int, tuple[str, frozenset[str]]]]:
    """folder -> UID -> (subject, flags) as the server reports them."""
    state: dict[str, dict[int, tuple[str, frozenset[str]]]] = {}
    with imap(served) as client:
        _, listing = client.list()
        for line in listing:
            assert isinstance(line, bytes)
            name = line.rsplit(b' "/" ', 1)[1].strip(b'"').decode()
            client.select(f'"{name}"', readonly=True)
            _, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            folder: dict[int, tuple[str, frozenset[str]]] = {}
            for item in data:
                if not isinstance(item, tuple):
                    continue
                head, body = item
                uid = int(re.search(rb"UID (\d+)", head).group(1))  # type: ignore[union-attr]
                flags = frozenset(re.search(rb"FLAGS \((.*?)\)", head).group(1).decode().split()) - {"\\Recent"}  # type: ignore[union-attr]
                folder[uid] = (body.decode().strip(), flags)
            state[name] = folder
        client.logout()
    return state


def local_state(root: Path) -> dict[str, set[tuple[str, str]]]:
    """folder dir -> {(subject line, maildir flag letters)} of the local Maildir."""
    state: dict[str, set[tuple[str, str]]] = {}
    for cur in root.rglob("cur"):
        folder = str(cur.parent.relative_to(root))
        entries = set()
        for sub in ("cur", "new"):
            for path in (cur.parent / sub).iterdir():
                subject = re.search(rb"Subject: [^\r\n]*", path.read_bytes()).group(0).decode()  # type: ignore[union-attr]
                letters = path.name.split(":2,", 1)[1] if ":2," in path.name else ""
                entries.add((subject, letters))
        state[folder] = entries
    return state


def mbsync(served: ServedBox, tmp: Path) -> subprocess.CompletedProcess[str]:
    local = tmp / "local"
    local.mkdir(exist_ok=True)
    rc = tmp / "mbsyncrc"
    rc.write_text(f"""IMAPAccount letterbox
Host localhost
Port {served.port("imaps")}
User {USER}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {served.ca_file}

IMAPStore remote
Account letterbox

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel letterbox
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
Sync All
""")
    result = subprocess.run([require_program("mbsync"), "-c", str(rc), "-a"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_mbsync_two_way_sync(served: ServedBox, tmp_path: Path) -> None:
    with imap(served) as client:
        client.create("Archive")
        for n in range(1, 5):
            client.append("INBOX", r"(\Seen)" if n == 1 else "()", None, message(n))
        client.append("Archive", r"(\Flagged)", None, message(10))
        client.logout()

    mbsync(served, tmp_path)
    local = tmp_path / "local"
    state = local_state(local)
    assert {s for s, _ in state["INBOX"]} == {f"Subject: sync {n}" for n in range(1, 5)}
    assert ("Subject: sync 1", "S") in state["INBOX"]
    assert ("Subject: sync 10", "F") in state["Archive"]

    # Local changes: read message 2, delete message 3 (mbsync expunges a trashed local file).
    for path in (local / "INBOX" / "cur").iterdir():
        data = path.read_bytes()
        base = path.name.split(":2,", 1)[0]
        if b"Subject: sync 2" in data:
            path.rename(path.parent / f"{base}:2,S")
        if b"Subject: sync 3" in data:
            path.unlink()
    for path in (local / "INBOX" / "new").iterdir():
        data = path.read_bytes()
        if b"Subject: sync 2" in data:
            path.rename(local / "INBOX" / "cur" / f"{path.name}:2,S")
        if b"Subject: sync 3" in data:
            path.unlink()
    # A new local message goes up.
    (local / "INBOX" / "new" / "1700000000.local1.host").write_bytes(message(20))
    # Server changes: flag message 4, a new message arrives.
    with imap(served) as client:
        client.select("INBOX")
        _, found = client.search(None, "SUBJECT", '"sync 4"')
        client.store(found[0].decode(), "+FLAGS", r"(\Flagged)")
        client.append("INBOX", "()", None, message(30))
        client.logout()

    mbsync(served, tmp_path)
    server = server_state(served)
    inbox = dict(server["INBOX"].values())
    assert "Subject: sync 3" not in inbox
    assert "\\Seen" in inbox["Subject: sync 2"]
    assert "Subject: sync 20" in inbox
    local_inbox = local_state(local)["INBOX"]
    assert ("Subject: sync 4", "F") in local_inbox
    assert any(s == "Subject: sync 30" for s, _ in local_inbox)

    # A second sync changes nothing on either side.
    before_server, before_local = server_state(served), local_state(local)
    mbsync(served, tmp_path)
    assert server_state(served) == before_server
    assert local_state(local) == before_local


def test_mutt_reads_the_mailbox(served: ServedBox, tmp_path: Path) -> None:
    with imap(served) as client:
        client.append("INBOX", "()", None, message(1))
        client.logout()
    out = tmp_path / "piped.txt"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(f"""set imap_user="{USER}"
set imap_pass="{PASSWORD}"
set ssl_ca_certificates_file="{served.ca_file}"
set ssl_verify_host=yes
set imap_authenticators="plain:login"
set wait_key=no
set confirmappend=no
set mbox_type=Maildir
set folder="imaps://localhost:{served.port("imaps")}/"
set spoolfile="+INBOX"
set header_cache=""
set message_cachedir=""
set certificate_file="{tmp_path / "mutt_certs"}"
""")
    mutt = require_program("mutt")
    command = (f"{mutt} -n -F {muttrc} -f imaps://localhost:{served.port('imaps')}/INBOX "
               f"-e 'push \"<display-message><exit><pipe-message>cat > {out}<enter><quit>\"'")
    result = subprocess.run([require_program("script"), "-qec", command, "/dev/null"],
                            capture_output=True, timeout=120, env={**os.environ, "TERM": "vt100"})
    assert out.exists(), result.stdout.decode(errors="replace")[-2000:]
    assert b"Subject: sync 1" in out.read_bytes()
    assert b"Body 1." in out.read_bytes()
    with imap(served) as client:
        client.select("INBOX")
        _, data = client.fetch("1", "(FLAGS)")
        assert isinstance(data[0], bytes), data
        assert b"\\Seen" in data[0], data  # mutt displayed it: read through the server, marked \Seen
        client.logout()
