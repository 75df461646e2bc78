"""Batched log rows ride in the next transaction the box commits anyway (a delivery's index write):
no lock, transaction or commit of their own on a busy box; a row that cannot be written never takes
the host transaction down with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.db import Database
from appliance.delivery_log import Delivery, DeliveryLog


def delivery(n: int, direction: str = "in") -> Delivery:
    return Delivery(direction=direction, result="delivered", sender="a@example.net",  # type: ignore[arg-type]
                    recipient=f"r{n}@example.test", at=1_800_000_000 + n)


async def count(db: Database, table: str) -> int:
    row = await db.fetchone(f"SELECT COUNT(*) FROM {table}")  # noqa: S608  the test's own table names
    assert row is not None
    return int(row[0])


def test_rows_ride_in_the_next_transaction_without_one_of_their_own(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int, int]:
        db = await Database.open(tmp_path / "x.db")
        log = DeliveryLog(db, flush_delay=3600)  # the timer would write them only in an hour
        transactions = 0
        real = db.transaction

        def counting(*, durable: bool = True):  # type: ignore[no-untyped-def]
            nonlocal transactions
            transactions += 1
            return real(durable=durable)

        try:
            await db.execute("CREATE TABLE host (n INTEGER)")
            db.transaction = counting  # type: ignore[method-assign]
            for n in range(5):
                log.record(delivery(n))
            before = await count(db, "delivery_log")
            await db.execute("INSERT INTO host VALUES (1)")  # a delivery's own write, say
            return before, await count(db, "delivery_log"), transactions
        finally:
            db.transaction = real  # type: ignore[method-assign]
            await log.close()
            await db.close()

    assert asyncio.run(scenario()) == (0, 5, 1)


def test_a_row_that_fails_does_not_undo_the_transaction_it_rides_in(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        db = await Database.open(tmp_path / "x.db")
        log = DeliveryLog(db, flush_delay=3600)
        try:
            await db.execute("CREATE TABLE host (n INTEGER)")
            log.record(delivery(1, direction="sideways"))  # refused by the table's CHECK
            await db.execute("INSERT INTO host VALUES (1)")
            log.record(delivery(2))
            await log.settle()
            return await count(db, "host"), await count(db, "delivery_log")
        finally:
            await log.close()
            await db.close()

    assert asyncio.run(scenario()) == (1, 1)
