"""The queue's per-recipient state in a real SQLite db: due jobs, attempts, expiry, settling (issue 7)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from appliance.db import Database
from appliance.queue.client import Outcome
from appliance.queue.retry import RetryPolicy
from appliance.queue.spool import Spool
from appliance.queue.state import QueueState, delete, flush

T = TypeVar("T")
POLICY = RetryPolicy(intervals=(60, 300), max_age=3600, delay_notice_after=600)
SENT = Outcome("2.0.0", "250 2.0.0 OK", "mx.far.test[192.0.2.1]")
LATER = Outcome("4.7.1", "451 4.7.1 greylisted", "mx.far.test[192.0.2.1]")
NEVER = Outcome("5.1.1", "550 5.1.1 no such user", "mx.far.test[192.0.2.1]")


def run(tmp_path: Path, body: Callable[[Database, Spool, QueueState], Awaitable[T]]) -> T:
    async def main() -> T:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            spool = Spool(tmp_path / "spool", db)
            return await body(db, spool, QueueState(db, spool.directory))
        finally:
            await db.close()

    return asyncio.run(main())


async def rows(db: Database) -> list[tuple[str, str, int, int, str, int]]:
    found = await db.fetchall("SELECT recipient, state, attempts, next_attempt, last_error, dsn_sent"
                              " FROM queue_recipients ORDER BY id")
    return [tuple(r) for r in found]


def test_due_jobs_are_grouped_per_message_and_domain(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        qid = await spool.enqueue("a@ours.test", ["x@far.test", "y@far.test", "z@other.test"], b"m\r\n")
        jobs = await state.due(now=2**40, limit=100, skip=set())
        assert sorted((j.domain, [r.address for r in j.recipients]) for j in jobs) == [
            ("far.test", ["x@far.test", "y@far.test"]), ("other.test", ["z@other.test"])]
        assert all(j.message_id == qid and j.sender == "a@ours.test" for j in jobs)
        assert [j.domain for j in await state.due(2**40, 100, {(qid, "far.test")})] == ["other.test"]
        assert await state.due(now=0, limit=100, skip=set()) == []  # not due yet

    run(tmp_path, body)


def test_outcomes_are_recorded_and_a_finished_message_disappears(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        qid = await spool.enqueue("a@ours.test", ["x@far.test", "y@far.test"], b"m\r\n")
        [job] = await state.due(2**40, 100, set())
        created = job.created_at
        recorded = await state.record(job, {"x@far.test": SENT, "y@far.test": LATER}, policy=POLICY,
                                      now=created + 1, tls="TLSv1.3")
        assert recorded.delayed == ()
        assert not recorded.needs_settling
        assert await rows(db) == [("x@far.test", "delivered", 1, created + 1, "250 2.0.0 OK", 0),
                                  ("y@far.test", "queued", 1, created + 61, "451 4.7.1 greylisted", 0)]
        tls = await db.fetchone("SELECT tls, status, remote FROM queue_recipients WHERE recipient = 'x@far.test'")
        assert tuple(tls) == ("TLSv1.3", "2.0.0", "mx.far.test[192.0.2.1]")  # type: ignore[arg-type]
        [job] = await state.due(2**40, 100, set())
        assert [r.address for r in job.recipients] == ["y@far.test"]
        await state.record(job, {"y@far.test": SENT}, policy=POLICY, now=created + 70)
        assert await rows(db) == []
        assert await spool.messages() == []
        assert not spool.path(qid).exists()

    run(tmp_path, body)


def test_a_permanent_failure_waits_for_its_report_then_goes(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        qid = await spool.enqueue("a@ours.test", ["x@far.test"], b"m\r\n")
        [job] = await state.due(2**40, 100, set())
        recorded = await state.record(job, {"x@far.test": NEVER}, policy=POLICY, now=job.created_at)
        assert recorded.needs_settling
        assert await state.unsettled() == [qid]
        settlement = await state.settlement(qid)
        assert settlement is not None
        assert settlement.finished
        assert settlement.sender == "a@ours.test"
        [failed] = settlement.failed
        assert (failed.address, failed.status, failed.diagnostic) == ("x@far.test", "5.1.1", "550 5.1.1 no such user")
        await state.settled(settlement)
        assert await rows(db) == []
        assert not spool.path(qid).exists()
        assert await state.unsettled() == []

    run(tmp_path, body)


def test_temporary_failures_expire_and_warn_once_on_the_way(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        await spool.enqueue("a@ours.test", ["x@far.test"], b"m\r\n")
        [job] = await state.due(2**40, 100, set())
        early = await state.record(job, {"x@far.test": LATER}, policy=POLICY, now=job.created_at + 10)
        assert early.delayed == ()
        [job] = await state.due(2**40, 100, set())
        late = await state.record(job, {"x@far.test": LATER}, policy=POLICY, now=job.created_at + 700)
        assert [d.address for d in late.delayed] == ["x@far.test"]
        [job] = await state.due(2**40, 100, set())
        assert job.recipients[0].delay_notified
        again = await state.record(job, {"x@far.test": LATER}, policy=POLICY, now=job.created_at + 800)
        assert again.delayed == ()  # once only
        [job] = await state.due(2**40, 100, set())
        assert job.recipients[0].attempts == 3
        gone = await state.record(job, {"x@far.test": LATER}, policy=POLICY, now=job.created_at + 3600)
        assert gone.needs_settling
        [(rcpt, status, attempts, _, error, _)] = await rows(db)
        assert (rcpt, status, attempts) == ("x@far.test", "failed", 4)
        assert error == "451 4.7.1 greylisted (gave up after 3600 seconds)"

    run(tmp_path, body)


def test_the_null_sender_is_never_warned(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        await spool.enqueue("", ["x@far.test"], b"m\r\n")
        [job] = await state.due(2**40, 100, set())
        recorded = await state.record(job, {"x@far.test": LATER}, policy=POLICY, now=job.created_at + 700)
        assert recorded.delayed == ()

    run(tmp_path, body)


def test_recipients_without_an_outcome_are_left_alone(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        await spool.enqueue("a@ours.test", ["x@far.test"], b"m\r\n")
        [job] = await state.due(2**40, 100, set())
        before = await rows(db)
        await state.record(job, {}, policy=POLICY, now=job.created_at + 5)
        assert await rows(db) == before

    run(tmp_path, body)


def test_flush_and_delete(tmp_path: Path) -> None:
    async def body(db: Database, spool: Spool, state: QueueState) -> None:
        first = await spool.enqueue("a@ours.test", ["x@far.test"], b"m\r\n")
        second = await spool.enqueue("a@ours.test", ["y@far.test"], b"m\r\n")
        await db.execute("UPDATE queue_recipients SET next_attempt = 2000000000")
        assert await flush(db, now=100) == 2
        assert {r[3] for r in await rows(db)} == {100}
        assert await flush(db, [second], now=50) == 1
        assert await delete(db, spool.directory, [first, "NOPE"]) == [first]
        assert [m.id for m in await spool.messages()] == [second]
        assert not spool.path(first).exists()
        assert spool.path(second).exists()

    run(tmp_path, body)
