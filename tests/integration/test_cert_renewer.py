"""The renewer with an injected clock, against pebble: not due -> nothing; due and the CA unreachable ->
the old certificate stays, the next try is 30-60 minutes later (jittered, or the CA's Retry-After),
nothing is tried before then; the postmaster gets one mail at 14 days left; the retry succeeds."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import messages

from appliance import certificates
from appliance.acme_client import explain
from appliance.acme_terms import parse_retry_after
from appliance.postmaster import mail_postmaster
from tests.conftest import BoxHandle
from tests.integration.test_acme_pebble import DOMAIN, configure
from tests.support.pebble import Pebble, running_pebble
from tests.support.ports import free_port
from tests.support.smtp_wire import maildir_messages, parse

pytestmark = pytest.mark.e2e
USER, PASSWORD = f"alice@{DOMAIN}", "correct horse battery"


@pytest.fixture
def pebble(box: BoxHandle, tmp_path: Path) -> Iterator[Pebble]:
    with running_pebble(tmp_path / "pebble", box.port("http"), box.port("https")) as p:
        configure(box, p)
        yield p


def set_setting(box: BoxHandle, key: str, value: str) -> None:
    box.run(box.services.db.set_setting(key, value))


def test_due_failure_retry_warning_then_success(box: BoxHandle, pebble: Pebble) -> None:
    box.add_user(USER, PASSWORD)  # the oldest mailbox of the primary domain receives postmaster mail
    ctx = box.services.certificates
    first, _ = box.run(certificates.request(ctx, [DOMAIN]), timeout=120)
    warnings: list[str] = []

    async def domains() -> list[str]:
        return [DOMAIN]

    async def warn(subject: str, text: str) -> None:
        warnings.append(subject)
        await mail_postmaster(box.services, subject, text)

    renewer = certificates.Renewer(ctx, domains, warn, rng=random.Random(7))

    # Just issued: not due; next check within 12 hours. The renewal window (ARI) was asked in the CPU
    # pool's worker process, so the ACME client's memory goes with it (issue 19).
    now = dt.datetime.now(dt.UTC)
    ctx.clock = lambda: now
    tasks = box.services.cpu.tasks
    assert box.run(renewer.check(), timeout=60) <= now + certificates.CHECK_EVERY
    assert box.services.cpu.tasks == tasks + 1

    # 13 days left and the CA unreachable: the old certificate stays, retry in 30-60 min, one warning mail.
    now = first.not_after - dt.timedelta(days=13)
    ctx.clock = lambda: now
    set_setting(box, certificates.DIRECTORY, f"https://127.0.0.1:{free_port()}/dir")
    retry = box.run(renewer.check(), timeout=60)
    assert now + dt.timedelta(minutes=30) <= retry <= now + dt.timedelta(minutes=60)
    assert box.services.tls.info().serial == first.serial
    status = box.run(certificates.status(ctx))
    assert status.last_error
    assert "cannot be reached" in status.last_error
    assert warnings == [f"Certificate of {box.services.hostname} expires in 13 days"]
    mail = maildir_messages(box.data.mail, USER)
    assert len(mail) == 1
    body = str(parse(mail[0]).get_payload(decode=True), "utf-8")  # type: ignore[arg-type]
    assert "expires in 13 days" in body
    assert "cannot be reached" in body

    # Ten minutes later: nothing is tried (no tight loop), no second warning.
    events_before = len(box.run(box.services.events.recent(500)))
    now = now + dt.timedelta(minutes=10)
    assert box.run(renewer.check()) == retry.replace(microsecond=0)
    assert len(box.run(box.services.events.recent(500))) == events_before

    # At the retry time, with the CA back: renewed, served.
    set_setting(box, certificates.DIRECTORY, pebble.directory)
    now = retry + dt.timedelta(seconds=1)
    box.run(renewer.check(), timeout=120)
    assert box.services.tls.info().serial != first.serial
    assert warnings == [f"Certificate of {box.services.hostname} expires in 13 days"]


def test_next_attempt_honours_retry_after() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rng = random.Random(1)
    times = {certificates.next_attempt(now, RuntimeError(), rng) for _ in range(50)}
    assert all(now + dt.timedelta(minutes=30) <= t <= now + dt.timedelta(minutes=60) for t in times)
    assert len(times) > 40  # jitter
    error = messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="too many certificates")  # type: ignore[call-arg]  # josepy fields
    error.retry_after = parse_retry_after("7200", now)
    problem = explain(error, "https://ca.example/dir")
    assert problem.kind == "rate-limit"
    assert "rate limit was reached: too many certificates." in problem.message
    assert "Try again in about" in problem.message
    assert certificates.next_attempt(now, problem, rng) == now + dt.timedelta(hours=2)
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT") == dt.datetime(2026, 10, 21, 7, 28, tzinfo=dt.UTC)
    assert parse_retry_after("soon") is None
    assert parse_retry_after("\u00b2") is None  # the CA's header, read as latin-1: isdigit() but no number
