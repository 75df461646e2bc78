"""A message is never lost to the content filter (issue 16): when rspamd, or the Redis under it, dies
while a message is being checked, the MX still answers 250 (or a 4xx the sender retries, never a
5xx) and the message is in the mailbox. A real rspamd + Redis for this module; the check is caught
mid-way by stopping the peer (SIGSTOP) and killed (SIGKILL) while the client waits for its reply."""

from __future__ import annotations

import signal
import smtplib
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle, require_program
from tests.support.polling import wait_until
from tests.support.rspamd import RspamdPeer, running_rspamd
from tests.support.smtp_wire import hold_outbound, maildir_messages, parse
from tests.support.spam_settings import use_rspamd

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
MESSAGE = (b"From: carol@external.test\r\nTo: alice@ourdomain.test\r\nSubject: important\r\n"
           b"Message-ID: <{n}@external.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
           b"The plumber comes on Thursday morning, please leave the key with the neighbours.\r\n")


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdPeer]:
    require_program("rspamd")
    require_program("redis-server")
    # rspamd waits this long for a stopped Redis: the check stays in progress until the kill.
    with running_rspamd(tmp_path_factory.mktemp("rspamd"), redis_timeout=60) as peer:
        yield peer


@pytest.fixture
def mx(box: BoxHandle, rspamd: RspamdPeer) -> BoxHandle:
    rspamd.revive()  # each test kills one of them
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    use_rspamd(box, rspamd.scanner, rspamd.controller, junk_score=6.0, reject_score=15.0)
    return box


def send_in_background(box: BoxHandle, data: bytes) -> tuple[threading.Thread, list[tuple[int, bytes]]]:
    replies: list[tuple[int, bytes]] = []

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=120) as client:
            client.ehlo("client.external.test")
            client.mail("carol@external.test")
            client.rcpt(ALICE)
            replies.append(client.data(data))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, replies


def delivered(box: BoxHandle, marker: bytes) -> list[bytes]:
    mail = [*maildir_messages(box.data.mail, ALICE), *maildir_messages(box.data.mail, ALICE, ".Junk")]
    return [raw for raw in mail if marker in raw]


def kill_mid_check(box: BoxHandle, rspamd: RspamdPeer, victim: str, n: int) -> tuple[int, bytes]:
    data = MESSAGE.replace(b"{n}", str(n).encode())
    redis_before = rspamd.established(rspamd.redis_port)
    rspamd.signal(victim, signal.SIGSTOP)
    try:
        thread, replies = send_in_background(box, data)
        wait_until(rspamd.established, what="the check reaching rspamd")
        if victim == "redis":
            # rspamd asks Redis for the Bayes statistics of this message; the stopped Redis holds it.
            wait_until(lambda: rspamd.established(rspamd.redis_port) > redis_before,
                       what="rspamd asking Redis")
        assert thread.is_alive(), replies  # the check is under way: DATA has no reply yet
    finally:
        rspamd.kill(victim)  # SIGKILL needs no SIGCONT: the process goes, stopped or not
    thread.join(timeout=90)
    assert not thread.is_alive()
    [(code, text)] = replies
    return code, text


def test_redis_killed_mid_check_the_message_is_accepted(mx: BoxHandle, rspamd: RspamdPeer) -> None:
    code, text = kill_mid_check(mx, rspamd, "redis", 1)
    assert code == 250 or 400 <= code < 500, (code, text)
    if code == 250:
        [raw] = delivered(mx, b"<1@external.test>")
        assert parse(raw)["X-Spam-Status"]  # scored without Bayes, or marked unchecked


def test_rspamd_killed_mid_check_the_message_is_accepted_and_filtering_is_off(
        mx: BoxHandle, rspamd: RspamdPeer) -> None:
    code, text = kill_mid_check(mx, rspamd, "rspamd", 2)
    assert code == 250, (code, text)
    [raw] = delivered(mx, b"<2@external.test>")
    assert parse(raw)["X-Spam-Status"].startswith("unchecked")
    spam_content = mx.services.spam_content
    assert spam_content is not None
    assert spam_content.filter.state.available is False
    assert not mx.run(spam_content.status()).filtering
