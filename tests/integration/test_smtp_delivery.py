"""Mail in over SMTP/LMTP ends up where it should: Maildir copies with trace headers, the spool,
bounces; quota; smuggling sequences; loops. Real sockets, real Maildir, real SQLite."""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import subprocess

import pytest

from appliance.accounts import MAX_ALIAS_DEPTH
from appliance.delivery_log import Search
from appliance.queue.spool import QueuedMessage
from tests.conftest import LETTERBOX, BoxHandle
from tests.support.smtp_wire import Wire, hold_outbound, lmtp_data, maildir_messages, parse

PASSWORD = "correct horse battery staple 9"
OURS = "ourdomain.test"
ALICE, BOB = f"alice@{OURS}", f"bob@{OURS}"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 300  # 21 kB
BODY = b"Subject: hello\r\nFrom: sender@external.test\r\n\r\nHi there.\r\n"


@pytest.fixture
def mx(box: BoxHandle) -> BoxHandle:
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    box.add_user(BOB, PASSWORD)
    return box


def inbox(box: BoxHandle, address: str) -> list[bytes]:
    return maildir_messages(box.data.mail, address)


def queue(box: BoxHandle) -> list[QueuedMessage]:

    return box.run(box.services.spool.messages())


def send_mx(box: BoxHandle, sender: str, rcpts: list[str], data: bytes = BODY) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        return client.data(data)


def trace_fields(raw: bytes) -> list[str]:
    """The names of the first header fields, in order."""
    return [name for name, _ in parse(raw).items()][:4]


def test_mx_delivers_with_return_path_delivered_to_and_received(mx: BoxHandle) -> None:
    code, text = send_mx(mx, "sender@external.test", [ALICE])
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.split()[-1].decode()
    [raw] = inbox(mx, ALICE)
    assert raw.endswith(BODY)
    assert trace_fields(raw) == ["Return-Path", "Delivered-To", "Received", "Subject"]
    msg = parse(raw)
    assert msg["Return-Path"] == "<sender@external.test>"
    assert msg["Delivered-To"] == ALICE
    received = " ".join(msg["Received"].split())
    assert received.startswith("from client.test ([127.0.0.1]) by mail.example.test (Letterbox) with ESMTP")
    assert f"id {queue_id} for <{ALICE}>;" in received
    assert email.utils.parsedate_to_datetime(received.rsplit(";", 1)[1].strip()) is not None
    assert inbox(mx, BOB) == []
    assert queue(mx) == []


def test_starttls_is_recorded_in_received(mx: BoxHandle) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=30) as client:
        client.starttls(context=mx.client_context)
        client.sendmail("sender@external.test", [ALICE], BODY)
    received = " ".join(parse(inbox(mx, ALICE)[0])["Received"].split())
    assert "with ESMTPS " in received
    assert "(using TLSv1." in received


def test_plus_tag_is_kept_and_case_folded(mx: BoxHandle) -> None:
    send_mx(mx, "sender@external.test", [f"Alice+News@{OURS.upper()}"])
    msg = parse(inbox(mx, ALICE)[0])
    assert msg["Delivered-To"] == f"alice+news@{OURS}"


def test_null_sender_is_accepted_on_mx(mx: BoxHandle) -> None:
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd("MAIL FROM:<>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        assert wire.cmd(BODY + b".")[0] == 250
    assert parse(inbox(mx, ALICE)[0])["Return-Path"] == "<>"


def test_one_copy_per_mailbox_even_if_named_twice(mx: BoxHandle) -> None:
    send_mx(mx, "sender@external.test", [ALICE, ALICE.upper(), f"alice+x@{OURS}"])
    assert len(inbox(mx, ALICE)) == 1


def test_alias_expansion_local_copies_and_forward_to_the_spool(mx: BoxHandle) -> None:
    mx.run(mx.services.accounts.add_alias(f"team@{OURS}", [ALICE, BOB, "Partner@External.test"]))
    code, text = send_mx(mx, "sender@external.test", [f"team@{OURS}"])
    assert code == 250
    for address in (ALICE, BOB):
        [raw] = inbox(mx, address)
        msg = parse(raw)
        assert msg["Delivered-To"] == address
        assert f"for <team@{OURS}>" in " ".join(msg["Received"].split())
    [queued] = queue(mx)
    # The forward goes out with an SRS sender of the alias's domain (issue 10 item 13).
    assert queued.sender.startswith("SRS0=")
    assert queued.sender.endswith(f"=external.test=sender@{OURS}")
    assert queued.auth_user is None
    assert [r.recipient for r in queued.recipients] == ["Partner@external.test"]
    spooled = (mx.data.spool / f"{queued.id}.eml").read_bytes()
    assert spooled.startswith(b"Received: from client.test")
    assert spooled.endswith(BODY)
    assert b"Return-Path" not in spooled
    # The alias that sent it on, as Postfix's local(8) writes it: it knows the forward if it comes back.
    assert parse(spooled).get_all("Delivered-To") == [f"team@{OURS}"]
    assert queued.id == text.split()[-1].decode()


def test_catch_all_takes_routing_tricks_locally_not_to_the_spool(mx: BoxHandle) -> None:
    mx.run(mx.services.accounts.add_alias(f"@{OURS}", [ALICE]))
    send_mx(mx, "sender@external.test", [f"user%external.test@{OURS}", f"external.test!user@{OURS}"])
    assert len(inbox(mx, ALICE)) == 1
    assert queue(mx) == []


def test_an_alias_loop_or_a_chain_too_deep_is_refused_as_such_not_as_an_unknown_user(mx: BoxHandle) -> None:
    """Both were '550 5.1.1 No such user here', which sent an administrator reading the log after a
    missing user; the other recipients of the transaction still get the mail."""
    accounts = mx.services.accounts
    mx.run(accounts.add_alias(f"a@{OURS}", [f"b@{OURS}"]))
    mx.run(accounts.add_alias(f"b@{OURS}", [f"a@{OURS}"]))
    for n in range(MAX_ALIAS_DEPTH + 1):
        mx.run(accounts.add_alias(f"chain{n}@{OURS}", [f"chain{n + 1}@{OURS}"]))
    mx.run(accounts.add_alias(f"chain{MAX_ALIAS_DEPTH + 1}@{OURS}", [ALICE]))
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd("MAIL FROM:<someone@external.test>")
        assert wire.cmd(f"RCPT TO:<a@{OURS}>") == (554, f"5.4.6 alias loop for <a@{OURS}>")
        assert wire.cmd(f"RCPT TO:<chain0@{OURS}>") == (554, f"5.4.6 alias chain too deep for <chain0@{OURS}>")
        assert wire.cmd(f"RCPT TO:<chain3@{OURS}>")[0] == 250  # 20 steps to Alice: within the limit
        assert wire.cmd(f"RCPT TO:<ghost@{OURS}>") == (550, f"5.1.1 <ghost@{OURS}>: No such user here")
        wire.cmd("DATA")
        assert wire.cmd(BODY + b".")[0] == 250
    assert len(inbox(mx, ALICE)) == 1


def test_a_catch_all_to_a_removed_mailbox_is_an_unknown_user_not_a_loop(mx: BoxHandle) -> None:
    """The catch-all sends bob@ to bob@ itself once the mailbox is gone: nobody, as in Postfix."""
    mx.run(mx.services.accounts.add_alias(f"@{OURS}", [BOB]))
    mx.run(mx.services.accounts.remove_user(BOB))
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd("MAIL FROM:<someone@external.test>")
        assert wire.cmd(f"RCPT TO:<ghost@{OURS}>") == (550, f"5.1.1 <ghost@{OURS}>: No such user here")


def test_bare_postmaster_is_accepted(mx: BoxHandle) -> None:
    mx.run(mx.services.accounts.add_alias(f"postmaster@{OURS}", [ALICE]))
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd("MAIL FROM:<someone@external.test>")
        assert wire.cmd("RCPT TO:<Postmaster>")[0] == 250  # RFC 5321 4.5.1
        wire.cmd("DATA")
        assert wire.cmd(BODY + b".")[0] == 250
    assert parse(inbox(mx, ALICE)[0])["Delivered-To"] == ALICE


def submit(box: BoxHandle, rcpts: list[str], data: bytes, sender: str = ALICE) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30) as client:
        client.starttls(context=box.client_context)
        client.login(ALICE, PASSWORD)
        client.mail(sender)
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(data)


def test_submission_local_and_remote(mx: BoxHandle) -> None:
    data = b"From: Alice <alice@ourdomain.test>\r\nTo: bob@ourdomain.test, carol@external.test\r\nSubject: s\r\n\r\nbody\r\n"
    code, _text = submit(mx, [BOB, "carol@external.test", "dave@external.test"], data)
    assert code == 250
    [raw] = inbox(mx, BOB)
    msg = parse(raw)
    assert msg["Return-Path"] == f"<{ALICE}>"
    received = " ".join(msg["Received"].split())
    assert "with ESMTPSA" in received
    assert f"(Authenticated sender: {ALICE})" in received
    assert PASSWORD.encode() not in raw
    assert msg["Date"]
    assert email.utils.parsedate_to_datetime(msg["Date"]) is not None
    assert msg["Message-ID"].endswith("@mail.example.test>")
    assert raw.endswith(b"\r\n\r\nbody\r\n")
    [queued] = queue(mx)
    assert queued.auth_user == ALICE
    assert queued.sender == ALICE
    assert [r.recipient for r in queued.recipients] == ["carol@external.test", "dave@external.test"]
    assert {r.domain for r in queued.recipients} == {"external.test"}
    spooled = (mx.data.spool / f"{queued.id}.eml").read_bytes()
    spooled_msg = parse(spooled)
    # The same Message-ID on both copies: it was added once, before the copies were made.
    assert spooled_msg["Message-ID"] == msg["Message-ID"]
    assert "for <" not in " ".join(spooled_msg["Received"].split())  # two recipients: no 'for'
    assert PASSWORD.encode() not in spooled

    listing = subprocess.run([LETTERBOX, "--data", str(mx.data.root), "queue", "list"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert queued.id in listing
    assert "carol@external.test  queued, 0 attempts" in listing
    assert "1 message, 2 recipients" in listing


def test_submission_keeps_an_existing_date_and_message_id(mx: BoxHandle) -> None:
    data = b"Date: Tue, 1 Oct 2024 10:00:00 +0000\r\nMessage-ID: <mine@client.test>\r\nSubject: s\r\n\r\nb\r\n"
    submit(mx, [BOB], data)
    raw = inbox(mx, BOB)[0]
    assert raw.endswith(data)
    assert raw.count(b"Message-ID:") == 1
    assert raw.count(b"Date:") == 1


def test_submissions_port_delivers_too(mx: BoxHandle) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", mx.port("submissions"), timeout=30, context=mx.client_context) as client:
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [BOB], b"Subject: 465\r\n\r\nx\r\n") == {}
    assert parse(inbox(mx, BOB)[0])["Subject"] == "465"


def test_smuggling_sequences_are_content_not_end_of_data(mx: BoxHandle) -> None:
    smuggled = (
        b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@external.test>\r\nRCPT TO:<bob@ourdomain.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n\r.\nQUIT\r\nlast line\r\n.\r\n"
    )
    with Wire(mx.port("smtp")) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd("MAIL FROM:<sender@external.test>")
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(smuggled)
        assert wire.reply()[0] == 250
        assert wire.cmd("NOOP")[0] == 250  # nothing smuggled is being answered
        assert wire.cmd("QUIT")[0] == 221
    [raw] = inbox(mx, ALICE)
    assert inbox(mx, BOB) == []
    # Kept as content, with bare LF and CR made into CRLF so no later hop can misread them.
    assert raw.endswith(
        b"first\r\n.\r\nMAIL FROM:<evil@external.test>\r\nRCPT TO:<bob@ourdomain.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n\r\n.\r\nQUIT\r\nlast line\r\n"
    )


def test_dot_stuffing_is_undone(mx: BoxHandle) -> None:
    send_mx(mx, "sender@external.test", [ALICE], b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n")
    assert inbox(mx, ALICE)[0].endswith(b"\r\n.leading dot\r\n..two\r\n")  # smtplib stuffs, we unstuff


def test_lines_over_1000_octets_are_delivered_whole(mx: BoxHandle) -> None:
    # Newsletters and HTML mail without a transfer encoding break RFC 5321's 1000: Postfix takes them.
    # 200 kB is past the reader's 64 KiB limit: that line is joined from its reads, dot unstuffed.
    body = b"Subject: long\r\n\r\n<p>" + b"a" * 5000 + b"</p>\r\n" + b"." + b"b" * 200_000 + b"\r\nend\r\n"
    assert send_mx(mx, "sender@external.test", [ALICE], b"From: sender@external.test\r\n" + body)[0] == 250
    assert inbox(mx, ALICE)[0].endswith(b"From: sender@external.test\r\n" + body)
    assert submit(mx, [BOB], f"From: {ALICE}\r\n".encode() + body)[0] == 250
    assert inbox(mx, BOB)[0].endswith(body[body.index(b"\r\n\r\n") :])  # submission adds Date, Message-ID


def test_a_looping_message_is_refused(mx: BoxHandle) -> None:
    looping = b"".join(b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for _ in range(60)) + BODY
    code, text = send_mx(mx, "sender@external.test", [ALICE], looping)
    assert (code, text[:5]) == (554, b"5.4.6")
    assert inbox(mx, ALICE) == []


def test_eight_bit_and_utf8_addresses(mx: BoxHandle) -> None:
    data = "Subject: grüße\r\n\r\nÄÖÜ\r\n".encode()
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=30) as client:
        client.ehlo("client.test")
        client.command_encoding = "utf-8"  # what sendmail() does when it uses SMTPUTF8
        client.mail("jörg@bücher.example", ["SMTPUTF8", "BODY=8BITMIME"])
        assert client.rcpt(f"jörg@{OURS}")[0] == 550  # no such (UTF-8) user: refused, not a crash
        assert client.rcpt(ALICE)[0] == 250
        assert client.data(data)[0] == 250
        client.rset()
        client.command_encoding = "utf-8"  # rset() put it back to ascii
        code, text = client.mail("jörg@bücher.example")  # without SMTPUTF8: RFC 6531 3.5
        assert (code, text[:5]) == (553, b"5.6.7")
    raw = inbox(mx, ALICE)[0]
    assert raw.endswith(data)
    assert raw.startswith("Return-Path: <jörg@xn--bcher-kva.example>\r\n".encode())
    assert "with UTF8SMTP " in parse(raw)["Received"]


# --- quota ------------------------------------------------------------------------------------------

def fill(box: BoxHandle, address: str, size: int) -> None:
    async def deliver() -> None:
        result = await box.services.store.deliver([address], b"Subject: filler\r\n\r\n" + b"x" * size)
        assert isinstance(result[address], int)

    box.run(deliver())


def test_full_mailbox_is_452_at_rcpt(mx: BoxHandle) -> None:
    mx.add_user(f"full@{OURS}", PASSWORD)
    fill(mx, f"full@{OURS}", 20_000)
    mx.run(mx.services.accounts.update_user(f"full@{OURS}", quota_bytes=10_000))
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@external.test")
        code, text = client.rcpt(f"full@{OURS}")
        assert (code, text[:5]) == (452, b"4.2.2")


def test_message_that_does_not_fit_is_452_at_data(mx: BoxHandle) -> None:
    mx.add_user(f"full@{OURS}", PASSWORD, quota_bytes=10_000)
    code, text = send_mx(mx, "sender@external.test", [f"full@{OURS}"], BIG)
    assert (code, text[:5]) == (452, b"4.2.2")
    assert inbox(mx, f"full@{OURS}") == []


def test_partial_quota_failure_is_accepted_and_bounced(mx: BoxHandle) -> None:
    mx.add_user(f"full@{OURS}", PASSWORD, quota_bytes=10_000)
    code, _ = send_mx(mx, BOB, [ALICE, f"full@{OURS}"], BIG)
    assert code == 250
    assert len(inbox(mx, ALICE)) == 1
    assert inbox(mx, f"full@{OURS}") == []
    [bounce] = inbox(mx, BOB)
    msg = parse(bounce)
    assert msg["Return-Path"] == "<>"
    assert msg.get_content_type() == "multipart/report"
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert f"Final-Recipient: rfc822; full@{OURS}" in text
    assert "Status: 5.2.2" in text


def lmtp_send(box: BoxHandle, rcpts: list[str], data: bytes) -> list[tuple[int, str]]:
    with lmtp_data(box.port("lmtp"), rcpts, timeout=10) as wire:
        wire.send(data + b".\r\n")
        replies = [wire.reply() for _ in rcpts]
        assert wire.cmd("QUIT")[0] == 221
        return replies


def test_lmtp_answers_each_recipient(mx: BoxHandle) -> None:
    mx.add_user(f"full@{OURS}", PASSWORD, quota_bytes=10_000)
    replies = lmtp_send(mx, [ALICE, f"full@{OURS}", BOB], BIG)
    assert [code for code, _ in replies] == [250, 452, 250]
    assert replies[1][1].startswith("4.2.2")
    assert len(inbox(mx, ALICE)) == len(inbox(mx, BOB)) == 1
    msg = parse(inbox(mx, ALICE)[0])
    assert "with LMTP" in " ".join(msg["Received"].split())
    assert inbox(mx, f"full@{OURS}") == []
    assert queue(mx) == []  # LMTP answered the failure itself: no bounce


def test_lmtp_refuses_a_forwarding_loop_for_the_looping_recipient_only(mx: BoxHandle) -> None:
    """Mail that comes back to an alias that forwarded it (its Delivered-To:) is a forwarding loop;
    LMTP answers per recipient, so the looping alias is refused and the other recipients get the mail
    (refused for all, the LMTP client bounced the other recipients' copies too)."""
    mx.run(mx.services.accounts.add_alias(f"team@{OURS}", [ALICE, "partner@external.test"]))
    looped = f"Delivered-To: team@{OURS}\r\n".encode() + BODY
    replies = lmtp_send(mx, [BOB, f"team@{OURS}"], looped)
    assert [code for code, _ in replies] == [250, 554], replies
    assert replies[1] == (554, f"5.4.6 mail forwarding loop for team@{OURS}")
    assert inbox(mx, ALICE) == []
    assert len(inbox(mx, BOB)) == 1
    assert queue(mx) == []  # nothing forwarded to partner@ again


def test_a_forwarding_loop_of_every_recipient_names_each_in_its_refusal(mx: BoxHandle) -> None:
    """When every recipient of a message loops, each refusal named the first one: LMTP's reply for
    sales@ said team@, and the delivery log's rows for both said team@. Now each names its own;
    SMTP's one reply names the first and counts the others."""
    mx.run(mx.services.accounts.add_alias(f"team@{OURS}", [ALICE, "partner@external.test"]))
    mx.run(mx.services.accounts.add_alias(f"sales@{OURS}", [BOB, "agency@external.test"]))
    looped = f"Delivered-To: team@{OURS}\r\nDelivered-To: sales@{OURS}\r\n".encode() + BODY
    replies = lmtp_send(mx, [f"team@{OURS}", f"sales@{OURS}"], looped)
    assert replies == [(554, f"5.4.6 mail forwarding loop for team@{OURS}"),
                       (554, f"5.4.6 mail forwarding loop for sales@{OURS}")]
    assert send_mx(mx, "sender@external.test", [f"sales@{OURS}", f"team@{OURS}"], looped) == (
        554, f"5.4.6 mail forwarding loop for sales@{OURS} and 1 other recipient".encode())
    rows = mx.run(mx.services.delivery_log.search(Search(result="rejected")))
    assert sorted((row.recipient, row.detail) for row in rows) == sorted(
        (f"{alias}@{OURS}", f"554 5.4.6 mail forwarding loop for {alias}@{OURS}")
        for alias in ("team", "sales", "team", "sales"))
    assert inbox(mx, ALICE) == inbox(mx, BOB) == []
    assert queue(mx) == []


def test_lmtp_refuses_non_local_recipients(mx: BoxHandle) -> None:
    with Wire(mx.port("lmtp")) as wire:
        wire.reply()
        wire.cmd("LHLO mta.test")
        wire.cmd("MAIL FROM:<sender@external.test>")
        assert wire.cmd("RCPT TO:<someone@external.test>")[0] == 554
        assert wire.cmd(f"RCPT TO:<nobody@{OURS}>")[0] == 550


def test_concurrent_sessions_all_delivered(mx: BoxHandle) -> None:
    async def one(i: int) -> None:
        await asyncio.to_thread(send_mx, mx, "sender@external.test", [ALICE], BODY + f"{i}\r\n".encode())

    async def all_of_them() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(all_of_them())
    bodies = sorted(raw.rsplit(b"\r\n", 2)[-2] for raw in inbox(mx, ALICE))
    assert bodies == sorted(str(i).encode() for i in range(20))
