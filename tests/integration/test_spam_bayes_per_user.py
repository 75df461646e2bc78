"""Per-mailbox Bayes next to the box-wide one (issue 16, image/overlay/etc/rspamd/local.d/statistic.conf),
against a real rspamd + Redis with the image's classifiers (`min_learns` at 20 for the test): two people
teach opposite verdicts about the same kind of mail by moving it with an IMAP client, and each then gets
their own verdict for a new one; mail to both of them is judged by the box-wide classifier alone."""

from __future__ import annotations

import imaplib
import random
import smtplib
from collections.abc import Iterator

import pytest

from tests.conftest import BoxHandle, require_program
from tests.integration.test_spam_bayes import HAM_WORDS, SPAM_WORDS, words
from tests.support.polling import wait_until
from tests.support.rspamd import RspamdPeer, running_rspamd
from tests.support.smtp_wire import hold_outbound, maildir_messages, parse
from tests.support.spam_settings import use_rspamd

PASSWORD = "correct horse battery staple 9"
ALICE, BOB = "alice@ourdomain.test", "bob@ourdomain.test"
LESSONS = 25  # of each kind, per person: above min_learns (20) even if rspamd skips a few
MIN_LEARNS = 20

# The kind of mail they disagree about: alice calls the garden club's newsletter spam, bob wants it.
NEWSLETTER = words(
    "garden club newsletter seedlings compost allotment pruning roses spring bulbs tomato greenhouse "
    "members autumn show prizes volunteer hedges mulch orchard apples pears blossom frost")
FAMILY, CASINO = HAM_WORDS, SPAM_WORDS
SENDERS = {NEWSLETTER: "news@gardenclub.example", FAMILY: "carol@family.example", CASINO: "promo@deals.example"}


def synthetic(words: tuple[str, ...], tag: str, to: str, rng: random.Random) -> bytes:
    body = "\r\n".join(" ".join(rng.choices(words, k=12)) for _ in range(5))
    return (f"From: {SENDERS[words]}\r\nTo: {to}\r\nSubject: {' '.join(rng.choices(words, k=4))}\r\n"
            f"Message-ID: <{tag}@example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdPeer]:
    require_program("rspamd")
    require_program("redis-server")
    with running_rspamd(tmp_path_factory.mktemp("rspamd"), min_learns=MIN_LEARNS) as peer:
        yield peer


def teach(box: BoxHandle, user: str, spam: tuple[str, ...], ham: tuple[str, ...], rng: random.Random) -> None:
    """`user` moves LESSONS messages of `spam` from the inbox into Junk and LESSONS of `ham` out of Junk."""
    store = box.services.store

    async def arrive() -> None:  # delivered by the store, which teaches nothing
        for n in range(LESSONS):
            await store.deliver([user], synthetic(ham, f"{user}-ham-{n}", user, rng), folder="Junk")
            await store.deliver([user], synthetic(spam, f"{user}-spam-{n}", user, rng))

    box.run(arrive(), timeout=120)
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context) as imap:
        imap.login(user, PASSWORD)
        imap.select("Junk")
        assert imap.uid("MOVE", f"1:{LESSONS}", "INBOX")[0] == "OK"
        imap.select("INBOX")
        assert imap.uid("MOVE", f"1:{LESSONS}", "Junk")[0] == "OK"


def test_each_mailbox_gets_the_verdict_it_taught(box: BoxHandle, rspamd: RspamdPeer) -> None:
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    box.add_user(BOB, PASSWORD)
    # The box's default thresholds: a person's own confident verdict alone decides (BAYES_SPAM_USER 6.5).
    use_rspamd(box, rspamd.scanner, rspamd.controller, junk_score=6.0, reject_score=15.0)
    spam_content = box.services.spam_content
    assert spam_content is not None
    rng = random.Random(1616)
    teach(box, ALICE, spam=NEWSLETTER, ham=FAMILY, rng=rng)
    teach(box, BOB, spam=CASINO, ham=NEWSLETTER, rng=rng)

    def taught() -> bool:
        counts = spam_content.learned
        return counts.spam + counts.ham + counts.skipped + counts.failed >= 4 * LESSONS

    wait_until(taught, seconds=180, what=f"{4 * LESSONS} lessons")
    counts = spam_content.learned
    assert counts.failed == 0, counts
    assert counts.spam >= 2 * MIN_LEARNS, counts
    assert counts.ham >= 2 * MIN_LEARNS, counts

    def send(data: bytes, *rcpts: str) -> None:
        with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=60) as client:
            assert client.sendmail("news@gardenclub.example", list(rcpts), data) == {}

    send(synthetic(NEWSLETTER, "news-alice", ALICE, rng), ALICE)
    send(synthetic(NEWSLETTER, "news-bob", BOB, rng), BOB)
    send(synthetic(NEWSLETTER, "news-both", f"{ALICE}, {BOB}", rng), ALICE, BOB)

    def found(user: str, folder: str, tag: bytes) -> list[dict[str, str]]:
        return [dict(parse(raw).items()) for raw in maildir_messages(box.data.mail, user, folder) if tag in raw]

    [alices] = found(ALICE, ".Junk", b"<news-alice@")
    assert alices["X-Spam-Flag"] == "YES"
    assert "BAYES_SPAM_USER" in alices["X-Spam-Symbols"], alices["X-Spam-Symbols"]
    [bobs] = found(BOB, "", b"<news-bob@")
    assert bobs["X-Spam-Flag"] == "NO"
    assert "BAYES_HAM_USER" in bobs["X-Spam-Symbols"], bobs["X-Spam-Symbols"]
    # To both: one check, no one's own statistics (both copies carry the same verdict).
    copies = found(ALICE, "", b"<news-both@") + found(ALICE, ".Junk", b"<news-both@") + \
        found(BOB, "", b"<news-both@") + found(BOB, ".Junk", b"<news-both@")
    assert len(copies) == 2
    assert copies[0]["X-Spam-Score"] == copies[1]["X-Spam-Score"]
    assert "_USER" not in copies[0].get("X-Spam-Symbols", "")
