"""A power cut keeps only what was fsynced: strace records the box's system calls while the MX takes one
message for a local mailbox and an alias forwarding outside, and the 250 must come after every step
that makes both copies survive a power cut, in this order: the local copy's file fsynced in tmp/,
renamed into new/, new/ fsynced, the database's WAL synced after that; the spool's file fsynced, linked
as <id>.eml, the spool directory fsynced, the WAL synced after that (appliance/store/arrivals.py,
appliance/queue/spool.py). A kill is not a power cut: the crash tests cannot see a missing fsync."""

from __future__ import annotations

import contextlib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServedBox
from tests.support.kill_points import traced
from tests.support.polling import wait_until
from tests.support.smtp_wire import hold_outbound_sql

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")


@dataclass(frozen=True)
class Call:
    name: str
    args: str  # as strace shows them, with -y's paths
    done: int  # the position of its completion among all calls' completions and starts


def calls(trace: Path) -> list[Call]:
    """Each completed call, in the order they completed (a call's "unfinished" start and "resumed"
    end, printed apart when threads interleave, are put together)."""
    started: dict[str, tuple[str, str]] = {}
    out = []
    for n, line in enumerate(trace.read_text().splitlines()):
        m = LINE.match(line)
        if m is None:
            continue
        pid, resumed, name, rest = m.groups()
        if resumed is not None:
            name, head = started.pop(pid, (resumed, ""))
            rest = head + rest
        elif rest.endswith("<unfinished ...>"):
            started[pid] = (name, rest)
            continue
        if " = -1 " in rest:
            continue
        out.append(Call(name, rest, n))
    return out


def first(found: list[Call], name: str, pattern: str, after: int = -1) -> int:
    """Where the first call `name` whose arguments match `pattern` completed, after `after`."""
    for call in found:
        if call.done > after and call.name == name and re.search(pattern, call.args):
            return call.done
    raise AssertionError(f"no {name} matching {pattern} after position {after}")


@contextlib.contextmanager
def tracing(box: ServedBox, trace: Path) -> Iterator[None]:
    """The box's writes, renames, links, syncs and sends recorded into `trace` (with -y's paths) while
    the block runs."""
    assert box.proc is not None
    pid = box.proc.pid
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-s", "64", "-o", str(trace), "-p", str(pid),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat,sendto,write"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: traced(pid), seconds=20, interval=0.02, what="strace attached")
        yield
    finally:
        tracer.terminate()
        tracer.wait(30)


def test_the_250_comes_after_every_fsync_a_power_cut_needs(served_box: ServedBox, tmp_path: Path) -> None:
    hold_outbound_sql(served_box.data.db)  # the forwarded copy stays in the spool
    served_box.add_user(ALICE, PASSWORD)
    served_box.cli("alias", "add", "fwd@ourdomain.test", "someone@elsewhere.example")
    trace = tmp_path / "trace"
    with tracing(served_box, trace), smtplib.SMTP("127.0.0.1", served_box.port("smtp"), timeout=30) as client:
        client.sendmail("sender@outside.example", [ALICE, "fwd@ourdomain.test"],
                        b"From: <sender@outside.example>\r\nSubject: power\r\n\r\nbody\r\n")

    found = calls(trace)
    reply = first(found, "sendto", r'"250 2\.0\.0')
    wal = r"letterbox\.db-wal>"

    # The local copy.
    home = re.escape(str(served_box.data.mail / "ourdomain.test" / "alice"))
    rename = next(c for c in found if c.name.startswith("rename") and re.search(rf'{home}/new/', c.args))
    tmp = home + re.escape("/tmp/")  # noqa: S108  the Maildir's tmp/
    base = re.search(rf'{tmp}([^"]+)"', rename.args)
    assert base is not None, rename
    written = first(found, "fsync", rf"{tmp}{re.escape(base.group(1))}>")
    assert written < rename.done
    directory = first(found, "fsync", rf"{home}/new>", after=rename.done)
    committed = first(found, "fdatasync", wal, after=directory)
    assert committed < reply, "the 250 came before the local copy was durable"

    # The spool's copy.
    spool = re.escape(str(served_box.data.spool))
    linked = next(c for c in found if c.name.startswith("link") and re.search(rf'{spool}/[0-9A-F]+\.eml"', c.args))
    assert first(found, "fsync", rf"{spool}/\.[0-9A-F]+\.eml\.tmp>") < linked.done
    directory = first(found, "fsync", rf"{spool}>", after=linked.done)
    committed = first(found, "fdatasync", wal, after=directory)
    assert committed < reply, "the 250 came before the spool's copy was durable"


def test_a_new_keyword_is_durable_before_the_store_is_answered(served_box: ServedBox, tmp_path: Path) -> None:
    """A keyword's letter is assigned in the folder's dovecot-keywords, written beside it and renamed over
    it: the folder's directory must be fsynced after the rename and before the answer, or a power cut
    brings the old map back, under which the message's letter names no keyword (it was renamed into
    place without that fsync, left alone by the last session)."""
    served_box.add_user(ALICE, PASSWORD)
    trace = tmp_path / "trace"
    imap = served_box.imap(ALICE, PASSWORD)
    try:
        assert imap.append("INBOX", None, None, b"Subject: keywords\r\n\r\nbody\r\n")[0] == "OK"
        imap.select("INBOX")
        with tracing(served_box, trace):
            typ, data = imap.store("1", "+FLAGS", "($Power)")
        assert typ == "OK", data
        assert b"$Power" in data[0], data
    finally:
        imap.logout()

    found = calls(trace)
    inbox = re.escape(str(served_box.data.mail / "ourdomain.test" / "alice"))
    renamed = next(c for c in found if c.name.startswith("rename") and re.search(rf'{inbox}/dovecot-keywords"', c.args))
    directory = first(found, "fsync", rf"{inbox}>", after=renamed.done)
    # The FETCH and the tagged OK: the next TLS record sent (application data, 23 = \27) after the rename.
    answer = first(found, "sendto", r'socket:\[\d+\]>, "\\27\\3\\3', after=renamed.done)
    assert directory < answer, "the STORE was answered before the new keyword map was durable"
