"""A failure report is sent once even when the box dies between sending it and recording it
(issue 11 item 12). The crash is stood in for by a failure at the worst moment: right after the
report was handed over, before the queue recorded that it was."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    Outbound,
    delivery_status,
    outbound_fixture,
    zone_fixture,
)


class Crash(Exception):
    pass


def failed_message(outbound: Outbound, sender: str) -> str:
    """A queued message from `sender` whose one recipient has failed, not yet reported."""
    box = outbound.box
    outbound.setting("queue_hold", "1")  # the queue itself must not touch it meanwhile
    queue_id = box.run(outbound.queue.spool.enqueue(sender, ["a@nomail.test"], b"Subject: s\r\n\r\nx\r\n"))
    box.run(box.services.db.execute(
        "UPDATE queue_recipients SET state = 'failed', status = '5.1.10', last_error = '556 5.1.10 null MX',"
        " attempts = 1 WHERE message_id = ?", (queue_id,)))
    return queue_id


def crash_once(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
    real = getattr(obj, name)
    calls = {"n": 0}

    async def fail_first(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Crash(f"died in {name}")
        return await real(*args, **kwargs)

    monkeypatch.setattr(obj, name, fail_first)


def test_a_report_to_a_local_mailbox_is_not_written_twice(outbound: Outbound,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    queue = outbound.queue
    queue_id = failed_message(outbound, ALICE)
    # The report reaches alice's inbox, then recording it fails: the message stays unsettled.
    crash_once(monkeypatch, queue.state, "settled")
    outbound.box.run(queue.reports.settle(queue_id))
    assert len(outbound.inbox()) == 1
    assert [m.id for m in outbound.messages()] == [queue_id]
    # What a restart does: settle what is unsettled. The copy is found; no second one.
    outbound.box.run(queue.reports.settle(queue_id))
    [report] = outbound.inbox()
    assert delivery_status(report)[1]["Final-Recipient"] == "rfc822; a@nomail.test"
    assert outbound.messages() == []


def test_a_report_to_a_remote_sender_is_spooled_with_its_record(outbound: Outbound,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    queue = outbound.queue
    queue_id = failed_message(outbound, "someone@example.org")
    # Recording fails inside the transaction that spools the report: neither happens.
    crash_once(monkeypatch, queue.state, "mark_settled")
    outbound.box.run(queue.reports.settle(queue_id))
    assert [m.id for m in outbound.messages()] == [queue_id]
    outbound.box.run(queue.reports.settle(queue_id))
    [report] = outbound.messages()
    assert report.sender == ""
    assert [r.recipient for r in report.recipients] == ["someone@example.org"]
