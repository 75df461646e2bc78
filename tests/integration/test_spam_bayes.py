"""Teaching rspamd by moving mail (issue 16): 200 synthetic spam moved into Junk and 200 ham moved out
of it by an IMAP client train rspamd's Bayes classifier (a real rspamd + Redis for this module, with
`min_learns` at 100), so that a new message of each kind arriving over SMTP is filed right."""

from __future__ import annotations

import imaplib
import random
import smtplib
from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle, require_program
from tests.support.polling import wait_until
from tests.support.rspamd import RspamdPeer, running_rspamd
from tests.support.smtp_wire import hold_outbound, maildir_messages, parse
from tests.support.spam_settings import use_rspamd

PASSWORD = "correct horse battery staple 9"
ALICE = "alice@ourdomain.test"
LESSONS = 200  # of each kind


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


SPAM_WORDS = words(
    "winner prize lottery casino bonus jackpot claim urgent offer exclusive cheap pills discount crypto "
    "bitcoin investment guaranteed profit million dollars wire transfer beneficiary unclaimed inheritance "
    "viagra pharmacy limited act now click here free gift card selected congratulations rich fast loan"
)
HAM_WORDS = words(
    "meeting agenda tomorrow school pickup dinner grandma birthday weekend garden photos holiday train "
    "tickets homework football practice recipe soup bakery library book club minutes project report "
    "draft review thanks cheers see you soon kitchen paint plumber invoice dentist appointment"
)


def synthetic(kind: str, n: int, rng: random.Random) -> bytes:
    words = SPAM_WORDS if kind == "spam" else HAM_WORDS
    sender = "promo@deals.example" if kind == "spam" else "carol@family.example"
    body = "\r\n".join(" ".join(rng.choices(words, k=12)) for _ in range(5))
    subject = " ".join(rng.choices(words, k=4))
    return (f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\nMessage-ID: <{kind}-{n}@example>\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdPeer]:
    require_program("rspamd")
    require_program("redis-server")
    with running_rspamd(tmp_path_factory.mktemp("rspamd"), min_learns=LESSONS // 2) as peer:
        yield peer


def test_moving_mail_in_and_out_of_junk_trains_bayes(box: BoxHandle, rspamd: RspamdPeer) -> None:
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    # Thresholds the trained classifier decides: BAYES_SPAM (up to 5.1) reaches 4, BAYES_HAM (-3) never.
    use_rspamd(box, rspamd.scanner, rspamd.controller, junk_score=4.0, reject_score=15.0)
    spam_content = box.services.spam_content
    assert spam_content is not None
    rng = random.Random(16)
    store = box.services.store

    async def arrive() -> None:
        # Mail as it would have arrived before the lesson: spam in the inbox, ham wrongly in Junk
        # (written by the store's delivery, which teaches nothing).
        for n in range(LESSONS):
            await store.deliver([ALICE], synthetic("ham", n, rng), folder="Junk")
            await store.deliver([ALICE], synthetic("spam", n, rng))

    box.run(arrive(), timeout=120)
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context) as imap:
        imap.login(ALICE, PASSWORD)
        imap.select("Junk")
        assert imap.uid("MOVE", f"1:{LESSONS}", "INBOX")[0] == "OK"  # the ham, out of Junk
        imap.select("INBOX")
        assert imap.uid("MOVE", f"1:{LESSONS}", "Junk")[0] == "OK"  # the spam, into Junk

    def taught() -> bool:
        counts = spam_content.learned
        return counts.spam + counts.ham + counts.skipped + counts.failed >= 2 * LESSONS

    wait_until(taught, seconds=180, what=f"{2 * LESSONS} lessons")
    counts = spam_content.learned
    # Once past min_learns rspamd skips a lesson its Bayes already agrees with at over 95 % (its
    # default learn condition): every lesson was given and taken or so judged, none failed.
    assert counts.failed == 0, counts
    assert counts.spam >= LESSONS // 2, counts
    assert counts.ham >= LESSONS // 2, counts

    def send(data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=60) as client:
            client.sendmail("someone@elsewhere.example", [ALICE], data)

    send(synthetic("spam", 10_000, rng))
    send(synthetic("ham", 10_000, rng))
    [spam] = [parse(raw) for raw in maildir_messages(box.data.mail, ALICE, ".Junk")
              if b"spam-10000@" in raw]
    [ham] = [parse(raw) for raw in maildir_messages(box.data.mail, ALICE) if b"ham-10000@" in raw]
    assert "BAYES_SPAM" in spam["X-Spam-Symbols"], spam["X-Spam-Symbols"]
    assert spam["X-Spam-Flag"] == "YES"
    assert "BAYES_HAM" in ham["X-Spam-Symbols"], ham["X-Spam-Symbols"]
    assert ham["X-Spam-Flag"] == "NO"
