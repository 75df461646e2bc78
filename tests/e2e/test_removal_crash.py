"""A removal killed half-way: `user remove` (and `domain remove`) move the files aside under deleted/
inside the removal's transaction (appliance/accounts/files.py), so a kill after the move and before the
commit leaves the row without its files. The kill is placed there by strace: SIGKILL at the removal's
first open of deleted/ itself (trash.move_aside's last directory fsync, after every rename). The
account must be as it was, with its mail and UIDs, after the next start; the start says what it put
back in one line."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import LETTERBOX, ServedBox

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
UIDS = re.compile(rb"UID (\d+)")


def killed_at_deleted(served: ServedBox, *args: str) -> None:
    """`letterbox ARGS` SIGKILLed by strace as it first opens deleted/ (its files already moved there)."""
    deleted = served.data.deleted
    deleted.mkdir(mode=0o700, exist_ok=True)  # -P names an existing path
    result = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "signal=none", "-P", str(deleted),
         "-e", "trace=openat", "-e", "inject=openat:signal=SIGKILL", LETTERBOX, *args],
        capture_output=True, text=True, env=served.env(), timeout=60,
    )
    assert result.returncode == -9 or result.returncode == 137, (result.returncode, result.stdout, result.stderr)
    assert any(deleted.iterdir()), "the kill came before the files were moved aside"


def alice_with_mail(served_box: ServedBox) -> None:
    """Alice, with three messages in INBOX and one in Work."""
    served_box.add_user(ALICE, PASSWORD)
    client = served_box.imap(ALICE, PASSWORD)
    for n in range(3):
        assert client.append("INBOX", "(\\Seen)", None, f"Subject: kept {n}\r\n\r\nbody {n}\r\n".encode())[0] == "OK"
    client.create("Work")
    assert client.append("Work", "()", None, b"Subject: work\r\n\r\nbody\r\n")[0] == "OK"
    client.logout()


def test_mailbox_removal_killed_before_its_commit_keeps_the_mailbox_and_its_mail(served_box: ServedBox) -> None:
    alice_with_mail(served_box)
    served_box.stop()

    killed_at_deleted(served_box, "user", "remove", ALICE)
    served_box.start()

    assert ALICE in served_box.cli("user", "list").stdout  # the removal never committed
    client = served_box.imap(ALICE, PASSWORD)
    typ, data = client.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    fetched = [(bytes(item[0]), bytes(item[1]).strip()) for item in data if isinstance(item, tuple)]  # type: ignore[index]
    assert [subject for _, subject in fetched] == [b"Subject: kept 0", b"Subject: kept 1", b"Subject: kept 2"]
    assert [m.group(1) for head, _ in fetched for m in [UIDS.search(head)] if m] == [b"1", b"2", b"3"]
    assert client.select("Work") == ("OK", [b"1"])
    client.logout()
    served_box.stop()
    log = served_box.log_path.read_text()
    assert len(re.findall(r"put back .*mailbox-alice@ourdomain\.test", log)) == 1, log
    assert not any((served_box.data.deleted).iterdir())

    # The removal done again, to its end: the mail goes aside and stays there.
    result = served_box.cli("user", "remove", ALICE)
    assert "removed mailbox" in result.stdout
    served_box.start()
    assert ALICE not in served_box.cli("user", "list").stdout
    assert not (served_box.data.mail / "ourdomain.test" / "alice").exists()
    [entry] = (served_box.data.deleted).iterdir()
    assert (entry / "mail" / "cur").is_dir()


def test_domain_removal_killed_before_its_commit_keeps_the_domains_dkim_key(served_box: ServedBox) -> None:
    served_box.cli("domain", "add", "spare.test")
    keys = served_box.data.dkim / "spare.test"
    before = sorted(p.name for p in keys.iterdir())
    assert before
    served_box.stop()

    killed_at_deleted(served_box, "domain", "remove", "spare.test")
    served_box.start()
    served_box.stop()

    assert "spare.test" in served_box.cli("domain", "list").stdout
    assert sorted(p.name for p in keys.iterdir()) == before



def test_a_removal_killed_while_the_box_runs_on_keeps_the_mail_it_had(served_box: ServedBox) -> None:
    """`letterbox user remove` killed while the box served: the box made the mailbox anew at the next
    login (its SELECT said NONEXISTENT until an APPEND made it), and at the next start the old mail
    could not go back to its place, taken: it stayed in deleted/, unseen, purged with the entry 30
    days later. It joins the new mail now."""
    alice_with_mail(served_box)

    killed_at_deleted(served_box, "user", "remove", ALICE)  # the box runs on
    client = served_box.imap(ALICE, PASSWORD)
    assert client.select("INBOX") == ("NO", [b"[NONEXISTENT] Mailbox does not exist"])  # its mail is gone
    assert client.append("INBOX", "()", None, b"Subject: since\r\n\r\nbody\r\n")[0] == "OK"  # made anew
    client.logout()
    served_box.stop()
    served_box.start()

    client = served_box.imap(ALICE, PASSWORD)
    assert client.select("INBOX")[0] == "OK"
    typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    subjects = sorted(bytes(item[1]).strip() for item in data if isinstance(item, tuple))
    assert subjects == [b"Subject: kept 0", b"Subject: kept 1", b"Subject: kept 2", b"Subject: since"]
    assert client.select("Work") == ("OK", [b"1"])
    client.logout()
    log = served_box.log_path.read_text()
    assert len(re.findall(r"put back alice@ourdomain\.test's mail \(\d+ entries\) beside", log)) == 1, log
    assert not list(served_box.data.deleted.glob("*/.removal"))
