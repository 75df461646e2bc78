"""rspamd as the MX's content filter (issue 16), against a real rspamd + Redis started for this module
(tests/support/rspamd.py): GTUBE is refused at DATA, a message scored between the two thresholds lands
in Junk with X-Spam-* fields, a clean one in the inbox; a sender's own X-Spam fields are dropped;
moves into and out of Junk by an IMAP client reach rspamd's controller as lessons; with rspamd
unreachable mail is accepted and the status says content filtering is off."""

from __future__ import annotations

import imaplib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.spam.content_filter import RETRY_SECONDS
from tests.conftest import LETTERBOX, BoxHandle, require_program
from tests.support.polling import wait_until
from tests.support.receivers import free_port
from tests.support.rspamd import RspamdPeer, running_rspamd
from tests.support.smtp_wire import hold_outbound, maildir_messages, parse
from tests.support.spam_settings import set_spam, use_rspamd
from tests.support.tcp_forward import Forwarder

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
# The GTUBE string rspamd knows (rspamd's libmime: the SpamAssassin test pattern).
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLEAN = (b"From: Carol <carol@external.test>\r\nTo: alice@ourdomain.test\r\nSubject: lunch\r\n"
         b"Message-ID: <lunch-1@external.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
         b"Shall we have lunch on Tuesday at the usual place?\r\n")
# Without a Message-ID rspamd adds MISSING_MID (2.5): between the test's thresholds of 2 and 15.
NO_MESSAGE_ID = CLEAN.replace(b"Message-ID: <lunch-1@external.test>\r\n", b"")
JUNK_SCORE, REJECT_SCORE = 2.0, 15.0


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdPeer]:
    require_program("rspamd")
    require_program("redis-server")
    # As on a box: rspamd's hs_helper is ended at once (the image's ExecStartPost).
    with running_rspamd(tmp_path_factory.mktemp("rspamd"), end_hs_helper=True) as peer:
        yield peer


@pytest.fixture
def mx(box: BoxHandle, rspamd: RspamdPeer) -> BoxHandle:
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    use_rspamd(box, rspamd.scanner, rspamd.controller, junk_score=JUNK_SCORE, reject_score=REJECT_SCORE)
    return box


def send_mx(box: BoxHandle, data: bytes, sender: str = "carol@external.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=60) as client:
        client.ehlo("client.external.test")
        client.mail(sender)
        code, text = client.rcpt(ALICE)
        assert code == 250, text
        return client.data(data)


def folder(box: BoxHandle, name: str = "") -> list[bytes]:
    return maildir_messages(box.data.mail, ALICE, name)


def test_gtube_is_refused_at_data(mx: BoxHandle) -> None:
    code, text = send_mx(mx, CLEAN.replace(b"Shall we", GTUBE + b"\r\nShall we"))
    assert code == 554, text
    assert b"5.7.1" in text
    assert b"spam" in text
    assert folder(mx) == []
    assert folder(mx, ".Junk") == []


def test_a_message_between_the_thresholds_lands_in_junk_with_the_headers(mx: BoxHandle) -> None:
    code, _ = send_mx(mx, NO_MESSAGE_ID)
    assert code == 250
    assert folder(mx) == []
    [raw] = folder(mx, ".Junk")
    msg = parse(raw)
    assert msg["X-Spam-Flag"] == "YES"
    score = float(msg["X-Spam-Score"])
    assert JUNK_SCORE <= score < REJECT_SCORE
    assert msg["X-Spam-Status"].startswith(f"Yes, score={score:.2f}")
    assert "MISSING_MID(2.50)" in " ".join(msg["X-Spam-Symbols"].split())
    assert raw.endswith(NO_MESSAGE_ID)


def test_rspamd_scores_on_pcre_and_its_hs_helper_ends_at_once(mx: BoxHandle, rspamd: RspamdPeer) -> None:
    """The image runs rspamd's regular expressions on PCRE2 (rspamd.conf.local, options.inc), so rspamd's
    hs_helper, which rspamd 3.4 forks at every start, has nothing to compile (its cache_dir cannot exist)
    and is ended as soon as it can end cleanly (letterbox-hs-helper-exit.sh): the regular-expression
    rules still score (GTUBE, MISSING_MID), no Hyperscan database of them is written for rspamd to load,
    and no hs_helper comes back, also after `systemctl reload rspamd` (a restart on a box)."""
    for round in ("start", "reload"):
        if round == "reload":
            rspamd.restart_rspamd()
        assert rspamd.wait_hs_helper_gone(120), (round, rspamd.titles())
        code, text = send_mx(mx, CLEAN.replace(b"Shall we", GTUBE + b"\r\nShall we"))
        assert code == 554, (round, text)
        code, _ = send_mx(mx, NO_MESSAGE_ID)
        assert code == 250
        titles = rspamd.titles()
        assert not any(t.startswith("rspamd: hs_helper") for t in titles), (round, titles)
        assert any(t.startswith("rspamd: controller") for t in titles), (round, titles)
        # Started as rspamd.service's ExecStart does: transparent huge pages off in every rspamd process.
        for pid in rspamd.pids():
            status = Path(f"/proc/{pid}/status").read_text()
            if "rspamd" in Path(f"/proc/{pid}/comm").read_text():
                assert re.search(r"^THP_enabled:\s+0$", status, re.MULTILINE), (round, pid, status)
    for raw in folder(mx, ".Junk"):
        assert "MISSING_MID(2.50)" in " ".join(parse(raw)["X-Spam-Symbols"].split())
    assert len(folder(mx, ".Junk")) == 2
    assert not [path.name for path in (rspamd.root / "db").iterdir() if path.name.endswith((".hs", ".hs.unser"))]
    log = (rspamd.root / "log" / "rspamd.log").read_text(errors="replace")
    assert log.count("do not respawn process hs_helper") == 2, log[-3000:]
    assert re.search(r"hs_helper process \d+ terminated normally", log), log[-3000:]
    assert "compiled" not in " ".join(line for line in log.splitlines() if "(hs_helper)" in line)


def test_a_clean_message_lands_in_the_inbox_and_forged_spam_fields_go(mx: BoxHandle) -> None:
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, forged\r\n\tcontinued\r\n" + CLEAN
    code, _ = send_mx(mx, forged)
    assert code == 250
    [raw] = folder(mx)
    msg = parse(raw)
    assert msg.get_all("X-Spam-Flag") == ["NO"]
    [status] = msg.get_all("X-Spam-Status") or []
    assert status.startswith("No, score=")
    assert b"forged" not in raw
    assert folder(mx, ".Junk") == []


def lessons(box: BoxHandle) -> int:
    spam_content = box.services.spam_content
    assert spam_content is not None
    counts = spam_content.learned
    return counts.spam + counts.ham + counts.skipped + counts.failed


def test_moves_by_an_imap_client_teach_rspamd(mx: BoxHandle) -> None:
    for n in range(2):
        # Different texts: rspamd learns a text once (it keeps a digest of what it learned).
        text = CLEAN.replace(b"lunch-1", f"lunch-{n + 2}".encode()).replace(b"Tuesday", [b"Monday", b"Friday"][n])
        assert send_mx(mx, text)[0] == 250
    with imaplib.IMAP4_SSL("127.0.0.1", mx.port("imaps"), ssl_context=mx.client_context) as imap:
        imap.login(ALICE, PASSWORD)
        imap.select("INBOX")
        assert imap.uid("MOVE", "1:*", "Junk")[0] == "OK"
        wait_until(lambda: lessons(mx) >= 2, what="two spam lessons")
        imap.select("Junk")
        assert imap.uid("COPY", "1", "Archive")[0] == "OK"  # out of Junk (a copy): ham
        assert imap.uid("MOVE", "2", "Trash")[0] == "OK"  # thrown away: no lesson
    wait_until(lambda: lessons(mx) >= 3, what="the ham lesson")
    spam_content = mx.services.spam_content
    assert spam_content is not None
    counts = spam_content.learned
    assert (counts.spam, counts.ham, counts.skipped, counts.failed) == (2, 1, 0, 0), counts


def test_rspamd_unreachable_accepts_into_the_inbox_and_says_filtering_is_off(mx: BoxHandle) -> None:
    set_spam(mx, rspamd_url="http://127.0.0.1:9")  # the discard port: nothing listens
    code, _ = send_mx(mx, CLEAN.replace(b"Shall we", GTUBE + b"\r\nShall we"))
    assert code == 250
    [raw] = folder(mx)
    assert parse(raw)["X-Spam-Status"].startswith("unchecked")
    spam_content = mx.services.spam_content
    assert spam_content is not None
    status = mx.run(spam_content.status())
    assert not status.filtering
    assert status.headline.startswith("content filtering is off")


def letterbox(box: BoxHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(box.data.root), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_cli_says_whether_filtering_is_on_and_teaches_rspamd(mx: BoxHandle, tmp_path: Path) -> None:
    status = letterbox(mx, "spam", "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("content filtering is on (rspamd)")
    folder = tmp_path / "Maildir" / ".Ham"
    (folder / "cur").mkdir(parents=True)
    for n, day in enumerate(("Wednesday", "Thursday", "Saturday")):  # texts no other test teaches
        text = CLEAN.replace(b"lunch-1", f"cli-{n}".encode()).replace(b"Tuesday", day.encode())
        (folder / "cur" / f"{n}.eml").write_bytes(text)
    learned = letterbox(mx, "spam", "learn", "ham", str(folder), "--each")
    assert learned.returncode == 0, learned.stderr
    assert learned.stdout.splitlines()[-1] == "3 messages as ham: 3 learned", learned.stdout
    set_spam(mx, rspamd_url="http://127.0.0.1:9")
    off = letterbox(mx, "spam", "status")
    assert off.returncode == 1
    assert off.stdout.startswith("content filtering is off")
    assert "content filtering is off" in off.stderr
    missing = letterbox(mx, "spam", "learn", "spam", str(tmp_path / "nothing"))
    assert missing.returncode == 1
    assert "no such file or Maildir folder" in missing.stderr


def test_rspamd_down_is_not_asked_per_message_and_is_asked_again_when_back(mx: BoxHandle,
                                                                           rspamd: RspamdPeer) -> None:
    """After a refused connection the MX does not knock again for each message (a thread handoff
    and a connection each, issue 19) but for a moment marks mail unchecked without asking; then it
    asks again by itself, and a returning rspamd scores mail and the filter is on once more."""
    spam_content = mx.services.spam_content
    assert spam_content is not None
    content_filter = spam_content.filter
    port = free_port(("127.0.0.1",))
    set_spam(mx, rspamd_url=f"http://127.0.0.1:{port}")  # nothing listens there yet
    content_filter.retry_seconds = 600.0  # the moment, long enough for any load on this machine
    numbered = [CLEAN.replace(b"lunch-1", f"back-{n}".encode()) for n in range(3)]
    assert send_mx(mx, numbered[0])[0] == 250
    scanner_port = int(rspamd.scanner.rpartition(":")[2])
    with Forwarder(port, scanner_port) as returned:  # rspamd answers at that address again
        assert send_mx(mx, numbered[1])[0] == 250
        assert returned.connections == 0  # not asked within the moment
        assert content_filter.state.available is False
        content_filter.retry_seconds = RETRY_SECONDS  # as shipped: asked again a moment later
        wait_until(lambda: send_mx(mx, numbered[2])[0] == 250 and scored(mx, b"back-2"),
                   what="a message scored by the returning rspamd", interval=0.5)
        assert returned.connections >= 1
        assert content_filter.state.available is True
    assert not scored(mx, b"back-0")
    assert not scored(mx, b"back-1")


def scored(box: BoxHandle, marker: bytes) -> bool:
    """Whether a copy carrying `marker` was scored by rspamd (not marked unchecked)."""
    return any(not parse(raw)["X-Spam-Status"].startswith("unchecked") for raw in folder(box) if marker in raw)
