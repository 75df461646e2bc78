"""appliance/spam/decisions.py: the batched log of spam decisions, and the spam settings (issue 16)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from appliance.db import Database
from appliance.settings import SPAM_KEYS, Settings, SpamSettings, decode, encode
from appliance.spam.decisions import DBL, DEFER, DNSBL, GREYLIST, REJECT, RSPAMD, Decision, DecisionLog


def test_spam_defaults_are_on_with_spamhaus_and_sane_limits() -> None:
    spam = decode({}, default_hostname="b.local").spam
    assert spam == SpamSettings()
    assert (spam.dnsbl, spam.domain_blocklist, spam.greylist, spam.early_talker, spam.content_filter) == (
        True, True, True, True, True)
    assert spam.dnsbl_lists == ("zen.spamhaus.org",)
    assert spam.domain_lists == ("dbl.spamhaus.org",)
    assert (spam.greylist_delay, spam.greylist_remember_days) == (300, 35)
    assert spam.outbound_messages_per_hour > 0
    assert spam.outbound_recipients_per_hour > 0
    assert spam.junk_score < spam.reject_score
    assert spam.skips("127.0.0.5")
    assert spam.skips("::1")
    assert not spam.skips("192.0.2.1")


def test_spam_settings_round_trip_and_bad_values_fall_back_one_by_one() -> None:
    changed = replace(SpamSettings(), dnsbl=False, dnsbl_lists=("a.example", "b.example"), greylist_delay=2,
                      greeting_delay=0.5, skip_networks=(), junk_score=4.5, rspamd_url="http://127.0.0.1:1")
    rows = encode({"spam": changed})
    assert set(rows) == set(SPAM_KEYS)
    assert decode(rows, default_hostname="b").spam == changed
    bad = {**rows, "spam_greylist_delay": "soon", "spam_dnsbl_lists": "not a name!", "spam_junk_score": "-1",
           "spam_skip_networks": "10.0.0.0/8, nonsense", "spam_rspamd_url": "ftp://x"}
    spam = decode(bad, default_hostname="b").spam
    assert spam.greylist_delay == 300
    assert spam.dnsbl_lists == ("zen.spamhaus.org",)
    assert spam.junk_score == SpamSettings().junk_score
    assert spam.skip_networks == SpamSettings().skip_networks
    assert spam.rspamd_url == SpamSettings().rspamd_url
    assert spam.dnsbl is False  # the good values stay


def test_spam_settings_save_is_live(tmp_path: Path) -> None:
    async def run() -> SpamSettings:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            settings = await Settings.load(db, default_hostname="b.local")
            await settings.save(spam=replace(settings.now.spam, greylist=False, skip_networks=()))
            return (await Settings.load(db, default_hostname="b.local")).now.spam
        finally:
            await db.close()

    spam = asyncio.run(run())
    assert spam.greylist is False
    assert spam.skip_networks == ()
    assert not spam.skips("127.0.0.1")


def test_decisions_are_batched_read_back_and_pruned(tmp_path: Path) -> None:
    now = [1_000_000.0]

    async def run() -> None:
        db = await Database.open(tmp_path / "db.sqlite")
        log = DecisionLog(db, keep_days=lambda: 30, clock=lambda: now[0], flush_delay=3600)
        try:
            log.record(Decision(layer=DNSBL, verdict=REJECT, reason="listed on zen.spamhaus.org",
                                client_ip="192.0.2.9", helo="spammer", sender="x@spam.example"))
            log.record(Decision(layer=RSPAMD, verdict="junk", reason="BAYES_SPAM", score=7.25, client_ip="192.0.2.8",
                                recipients=("alice@example.test", "bob@example.test"), queue_id="Q1"))
            # Nothing is written by record() itself: the timer (an hour here) has not fired.
            row = await db.fetchone("SELECT COUNT(*) FROM spam_decisions")
            assert row is not None
            assert row[0] == 0
            recent = await log.recent()  # reading flushes first
            assert [d.layer for d in recent] == [RSPAMD, DNSBL]
            assert recent[0].recipients == ("alice@example.test", "bob@example.test")
            assert recent[0].score == 7.25
            assert recent[0].queue_id == "Q1"
            assert recent[1].score is None
            assert recent[1].at == now[0]
            assert [d.client_ip for d in await log.recent(layer=DNSBL)] == ["192.0.2.9"]
            assert await log.recent(verdict=DEFER) == []
            assert await log.counts() == {(DNSBL, REJECT): 1, (RSPAMD, "junk"): 1}
            now[0] += 31 * 86400
            log.record(Decision(layer=GREYLIST, verdict=DEFER, helo="h" * 5000, recipients=tuple(
                f"r{i}@example.test" for i in range(60))))
            await log.prune()  # the flush before it already pruned (due: an hour since the last)
            (left,) = await log.recent()
            assert left.layer == GREYLIST
            assert len(left.helo) <= 320
            assert left.recipients[-1] == "(+10 more)"
            assert await log.counts(since=now[0]) == {(GREYLIST, DEFER): 1}
        finally:
            await log.close()
            await db.close()

    asyncio.run(run())


def test_a_burst_is_written_in_few_commits_and_close_writes_the_rest(tmp_path: Path) -> None:
    async def run() -> tuple[int, int]:
        db = await Database.open(tmp_path / "db.sqlite")
        log = DecisionLog(db, flush_delay=0.05)
        commits = 0
        real = db.transaction

        def counting(*, durable: bool = True):  # type: ignore[no-untyped-def]
            nonlocal commits
            commits += 1
            return real(durable=durable)

        db.transaction = counting  # type: ignore[method-assign]
        try:
            for i in range(450):
                log.record(Decision(layer=DBL, verdict=REJECT, client_ip=f"192.0.2.{i % 250}"))
            await log.close()
            row = await db.fetchone("SELECT COUNT(*) FROM spam_decisions")
            assert row is not None
            return int(row[0]), commits
        finally:
            await db.close()

    count, commits = asyncio.run(run())
    assert count == 450
    assert commits <= 4  # 450 decisions: two full batches and the rest, not one commit each
