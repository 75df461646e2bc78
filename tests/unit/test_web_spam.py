"""The console's Spam page and a mailbox owner's Junk page (issue 16): who may see what, the content
filter's settings with their checks and CSRF, the status when rspamd cannot be reached, Junk counts,
and releasing a message from Junk into the inbox."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.spam.content_service import SpamContent, content_settings_of
from appliance.spam.decisions import RSPAMD, Decision
from appliance.spam.greylist import Greylist
from appliance.store.model import JUNK
from tests.support.web import ADMIN, ADMIN_PASSWORD, ALICE, ALICE_PASSWORD, WebClient, web_client

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there
SPAM = b"From: Prize Desk <win@lottery.example>\r\nSubject: You won\r\nX-Spam-Score: 9.10\r\n\r\nClaim it.\r\n"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.add_user()
        svc = client.services
        svc.spam_content = SpamContent(svc.store, svc.events, content_settings_of(svc))
        spam = dataclasses.replace(client.run(svc.settings.fresh).spam, rspamd_url=NOWHERE, rspamd_controller_url=NOWHERE)
        client.run(svc.settings.save, spam=spam)
        yield client


def test_admin_sees_the_spam_page_and_that_filtering_is_off(web: WebClient) -> None:
    web.run(web.services.store.deliver, [ALICE], SPAM, folder=JUNK)
    web.services.spam_decisions.record(Decision(
        layer=RSPAMD, verdict="junk", reason="MISSING_MID(2.50)", client_ip="192.0.2.7", sender="a@b.example",
        recipients=(ALICE,), score=7.25))
    web.login(ADMIN, ADMIN_PASSWORD)
    page = web.get("/console/spam")
    assert page.status_code == 200
    assert "content filtering is off" in page.text
    assert f"<td>{ALICE}</td><td>1</td>" in page.text
    assert "<td>7.25</td><td><code>192.0.2.7</code></td>" in page.text
    assert f"a@b.example → {ALICE}" in page.text
    assert "1 rspamd junk" in page.text
    status = web.get("/console")
    assert "content filtering is off" in status.text


def test_content_settings_are_checked_and_saved_with_an_event(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    form = {"enabled": "on", "scanner": NOWHERE, "controller": NOWHERE, "junk": "15", "reject": "10"}
    refused = web.post("/console/spam/content", form, token_from="/console/spam")
    assert refused.status_code == 400
    assert "the junk score must be below the reject score" in refused.text
    assert web.post("/console/spam/content", {**form, "scanner": "ftp://x"}, token_from="/console/spam").status_code == 400
    saved = web.post("/console/spam/content", {**form, "junk": "5.5", "reject": "12"}, token_from="/console/spam")
    assert saved.status_code == 303
    now = web.run(web.services.settings.fresh)
    assert (now.spam.junk_score, now.spam.reject_score, now.spam.content_filter) == (5.5, 12.0, True)
    off = web.post("/console/spam/content", {**form, "enabled": "", "junk": "5.5", "reject": "12"},
                   token_from="/console/spam")
    assert off.status_code == 303
    assert not web.run(web.services.settings.fresh).spam.content_filter
    assert any(kind == "spam" and "content filter off" in text for _, kind, text in web.run(web.services.events.recent))


def test_a_form_without_the_csrf_token_is_refused(web: WebClient) -> None:
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.post("/console/spam/content", {"junk": "1", "reject": "2"}, csrf="forged")
    assert response.status_code == 403


def test_owners_see_their_junk_and_release_a_message_but_not_the_admin_page(web: WebClient) -> None:
    web.run(web.services.store.deliver, [ALICE], SPAM, folder=JUNK)
    web.login(ALICE, ALICE_PASSWORD)
    assert web.get("/console/spam").status_code == 403
    assert "1 message in Junk" in web.get("/account").text
    page = web.get("/account/junk")
    assert page.status_code == 200
    assert "You won" in page.text
    assert "lottery.example" in page.text
    assert '<a href="/account">Back to your account</a>.' in page.text  # as the mail log says it ("your mailbox": the mail?)
    released = web.post("/account/junk/release", {"uid": "1"}, token_from="/account/junk")
    assert released.status_code == 303
    store = web.services.store
    assert len(web.run(store.snapshot, ALICE, "INBOX").messages) == 1
    assert web.run(store.snapshot, ALICE, JUNK).messages == ()
    again = web.post("/account/junk/release", {"uid": "1"}, token_from="/account/junk")
    assert again.status_code == 303
    assert "no longer in Junk" in web.get("/account/junk").text
    assert web.post("/account/junk/release", {"uid": "x"}, token_from="/account/junk").status_code == 400
    assert web.post("/account/junk/release", {"uid": "\u00b2"}, token_from="/account/junk").status_code == 400
    events = web.run(web.services.events.recent)
    assert any(f"released from Junk by {ALICE}" in text for _, _, text in events)


def test_the_junk_page_lists_messages_whose_from_the_address_parser_cannot_read(web: WebClient) -> None:
    """A spammer's From: of groups or comments nested thousands deep made the structured header
    parser raise (AttributeError, RecursionError): the owner's Junk page was a 500 for as long as
    the message stayed; a From: of thousands of addresses took it seconds per message. From: is
    shown as the text it is."""
    hostile = [b"g:" * 3000 + b";" * 3000, b"(" * 5000 + b")" * 5000, b"a, " * 5000]
    for sender in hostile:
        web.run(web.services.store.deliver, [ALICE], b"From: " + sender + b"\r\nSubject: Nested\r\n\r\nx\r\n", folder=JUNK)
    web.run(web.services.store.deliver, [ALICE], SPAM, folder=JUNK)
    web.login(ALICE, ALICE_PASSWORD)
    page = web.get("/account/junk")
    assert page.status_code == 200
    assert page.text.count("Nested") == 3
    assert "Prize Desk &lt;win@lottery.example&gt;" in page.text


def test_admin_switches_the_layers_and_clears_the_greylist(web: WebClient) -> None:
    web.run(Greylist(web.services.db).check, "192.0.2.0/24", "a@b.example", ALICE, delay=300, remember_days=35)

    async def suspend() -> None:
        await web.services.db.execute("INSERT INTO outbound_suspended (mailbox, since, reason) VALUES (?, 0, ?)",
                                      (ALICE, "20 refused recipients"))
    web.run(suspend)
    web.login(ADMIN, ADMIN_PASSWORD)
    page = web.get("/console/spam")
    assert "<code>192.0.2.0/24</code>" in page.text
    assert "zen.spamhaus.org" in page.text
    assert "20 refused recipients" in page.text
    form = {"dnsbl": "on", "dnsbl_lists": "zen.spamhaus.org, bl.example.org", "domain_blocklist": "",
            "domain_lists": "dbl.spamhaus.org", "early_talker": "on", "greylist": "", "greylist_delay": "120",
            "outbound_messages_per_hour": "50", "outbound_recipients_per_hour": "200"}
    bad = web.post("/console/spam/layers", {**form, "dnsbl_lists": "not a list!"}, token_from="/console/spam")
    assert bad.status_code == 400
    assert "is not a DNS list name" in bad.text
    assert web.post("/console/spam/layers", form, token_from="/console/spam").status_code == 303
    spam = web.run(web.services.settings.fresh).spam
    assert (spam.dnsbl, spam.domain_blocklist, spam.greylist, spam.greylist_delay) == (True, False, False, 120)
    assert spam.dnsbl_lists == ("zen.spamhaus.org", "bl.example.org")
    assert spam.outbound_messages_per_hour == 50
    events = [text for _, kind, text in web.run(web.services.events.recent) if kind == "spam"]
    assert any("domain_blocklist off, greylist off" in text for text in events), events
    assert web.post("/console/spam/greylist/clear", {}, token_from="/console/spam").status_code == 303
    assert "Nobody is greylisted" in web.get("/console/spam").text
    lifted = web.post("/console/spam/suspended/lift", {"address": ALICE}, token_from="/console/spam")
    assert lifted.status_code == 303
    assert "No mailbox is suspended" in web.get("/console/spam").text
