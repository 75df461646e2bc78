"""The content filter's pure parts (issue 16): rspamd's reply read defensively, request headers that
cannot be broken by a client's HELO, the MX's verdicts as rspamd symbols, X-Spam fields written and
a sender's own removed, which moves teach what, and the settings' checks."""

from __future__ import annotations

import json

import pytest

from appliance.smtp.content import ContentFacts
from appliance.spam.content_filter import (
    ContentSettings,
    auth_symbols,
    remove_spam_fields,
    spam_headers,
    statistics_owner,
)
from appliance.spam.content_service import ContentSettingsError, validate_content_settings
from appliance.spam.learning import lesson
from appliance.spam.rspamd import Endpoint, Envelope, RspamdUnavailable, parse_result
from appliance.store.model import Filed

REPLY = {
    "is_skipped": False, "score": 7.3, "required_score": 15.0, "action": "add header",
    "symbols": {
        "MISSING_MID": {"name": "MISSING_MID", "score": 2.5, "metric_score": 2.5},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "options": ["text/plain"]},
        "BAYES_SPAM": {"name": "BAYES_SPAM", "score": 4.9, "options": ["99.9%"]},
        "ZERO": {"name": "ZERO", "score": 0.0},
    },
    "messages": {"smtp_message": "Gtube pattern"},
}


def test_a_reply_is_read_and_its_symbols_ranked() -> None:
    result = parse_result(json.dumps(REPLY).encode())
    assert (result.score, result.action, result.skipped, result.message) == (7.3, "add header", False, "Gtube pattern")
    assert [s.name for s in result.top_symbols()] == ["BAYES_SPAM", "MISSING_MID", "MIME_GOOD"]


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"score": "NaN"}', b'{"score": null}', b'{"action": "x"}'])
def test_an_unreadable_reply_means_rspamd_is_unavailable(body: bytes) -> None:
    with pytest.raises(RspamdUnavailable):
        parse_result(body)


def test_odd_symbol_values_do_not_break_the_reading() -> None:
    reply = {"score": 1.0, "symbols": {"A": "x", "B": {"score": "oops"}, "C": {"score": 1e400}}}
    result = parse_result(json.dumps(reply).replace("Infinity", "1e999").encode())
    assert [s.score for s in result.symbols] == [0.0, 0.0, 0.0]


def test_request_headers_carry_the_envelope_safely() -> None:
    envelope = Envelope(ip="192.0.2.1", helo="evil\r\nRcpt: injected", sender="", recipients=("a@x.test", "b@x.test"),
                        user="", queue_id="Q1", symbols={"R_SPF_FAIL": 1.0})
    headers = envelope.headers()
    assert ("From", "<>") in headers
    assert [v for n, v in headers if n == "Rcpt"] == ["a@x.test", "b@x.test"]
    assert dict(headers)["Helo"] == "evil??Rcpt: injected"
    assert json.loads(dict(headers)["Settings"]) == {"symbols": {"R_SPF_FAIL": 1.0}}
    assert "User" not in dict(headers)


def test_endpoints() -> None:
    assert str(Endpoint.parse("http://127.0.0.1:11333", 1)) == "http://127.0.0.1:11333"
    assert str(Endpoint.parse("localhost", 11334)) == "http://localhost:11334"
    assert str(Endpoint.parse("[::1]:5", 1)) == "http://[::1]:5"
    for bad in ("https://x:1", "http://", "http://x:99999"):
        with pytest.raises(ValueError, match=r"."):
            Endpoint.parse(bad, 1)


def facts(**results: str) -> ContentFacts:
    return ContentFacts("192.0.2.1", "mx.test", "a@x.test", ("b@y.test",), ("b@y.test",), "Q", **results)


def test_the_mx_verdicts_become_rspamd_symbols() -> None:
    assert auth_symbols(facts()) == {}
    assert auth_symbols(facts(spf="fail", dkim="pass", dmarc="fail", dmarc_policy="quarantine")) == {
        "R_SPF_FAIL": 1.0, "R_DKIM_ALLOW": 1.0, "DMARC_POLICY_QUARANTINE": 1.0}
    assert auth_symbols(facts(spf="pass", dkim="none", dmarc="pass")) == {
        "R_SPF_ALLOW": 1.0, "R_DKIM_NA": 1.0, "DMARC_POLICY_ALLOW": 1.0}
    assert auth_symbols(facts(dmarc="fail", dmarc_policy="none")) == {"DMARC_POLICY_SOFTFAIL": 1.0}


def test_spam_fields_of_the_sender_are_removed_and_ours_written() -> None:
    data = (b"Subject: hi\r\nX-Spam-Flag: NO\r\nx-spam-status: No,\r\n forged\r\nX-Spammy: keep\r\n"
            b"X-Spam: yes\r\n\r\nX-Spam-Flag: body text stays\r\n")
    assert remove_spam_fields(data) == b"Subject: hi\r\nX-Spammy: keep\r\n\r\nX-Spam-Flag: body text stays\r\n"
    assert remove_spam_fields(b"Subject: clean\r\n\r\nbody") == b"Subject: clean\r\n\r\nbody"
    result = parse_result(json.dumps(REPLY).encode())
    fields = spam_headers(result, ContentSettings(junk_score=6, reject_score=15), junk=True).decode()
    assert fields.startswith("X-Spam-Flag: YES\r\nX-Spam-Score: 7.30\r\nX-Spam-Status: Yes, score=7.30 junk=6.00 reject=15.00\r\n")
    assert "X-Spam-Symbols: BAYES_SPAM(4.90),\r\n\tMISSING_MID(2.50),\r\n\tMIME_GOOD(-0.10)\r\n" in fields


@pytest.mark.parametrize(("source", "target", "expected"), [
    ("INBOX", "Junk", True), (None, "Junk", True), ("Archive", "Junk", True),
    ("Junk", "INBOX", False), ("Junk", "Archive", False),
    ("Junk", "Trash", None), ("Junk", "Junk", None), ("INBOX", "Archive", None), (None, "INBOX", None),
])
def test_which_moves_teach_what(source: str | None, target: str, expected: bool | None) -> None:
    assert lesson(Filed("a@x.test", source, target, (1,))) is expected


def test_content_settings_are_checked() -> None:
    validate_content_settings(scanner="http://127.0.0.1:11333", controller="127.0.0.1:11334", junk=6, reject=15)
    for kwargs, field in (
        ({"junk": 15.0, "reject": 6.0}, "junk"), ({"junk": float("nan")}, "junk"), ({"reject": 0.0}, "reject"),
        ({"scanner": "ftp://x"}, "scanner"), ({"controller": "http://x:0x"}, "controller"),
    ):
        values = {"scanner": "http://127.0.0.1:11333", "controller": "http://127.0.0.1:11334", "junk": 6.0,
                  "reject": 15.0, **kwargs}
        with pytest.raises(ContentSettingsError) as caught:
            validate_content_settings(**values)  # type: ignore[arg-type]
        assert caught.value.field == field


def test_only_mail_to_one_mailbox_is_judged_by_its_owners_own_bayes() -> None:
    def facts(*mailboxes: str) -> ContentFacts:
        return ContentFacts("192.0.2.1", "mx.test", "a@x.test", ("family@y.test",), mailboxes, "Q")

    assert statistics_owner(facts("b@y.test")) == "b@y.test"
    assert statistics_owner(facts("b@y.test", "c@y.test")) == ""  # an alias for two: box-wide only
    assert statistics_owner(facts()) == ""


@pytest.mark.parametrize(("scanner", "problem", "installed", "says", "never"), [
    ("http://127.0.0.1:11333", "rspamd at http://127.0.0.1:11333 does not answer", False,
     "is not installed on this computer. Install it (on Debian or Ubuntu: sudo apt install", "systemctl"),
    ("http://localhost:11333", "rspamd at http://localhost:11333 does not answer", True,
     "rspamd is installed here. Just after the box started", "apt install"),
    ("http://[::1]:11333", "rspamd at http://[::1]:11333 does not answer", True, "systemctl restart", "apt install"),
    ("http://10.0.0.5:11333", "rspamd at http://10.0.0.5:11333 does not answer", False,
     "runs on that machine and lets this box connect", "install"),
    ("ftp://x", "the rspamd address must be http://host:port", True, "Correct rspamd's address", "install"),
])
def test_the_content_filter_fix_fits_the_box(scanner: str, problem: str, installed: bool, says: str,
                                              never: str) -> None:
    """What the status checklist tells a person whose spam filter does not answer: install rspamd on a
    box without it (a checkout's `make run`), start it where it is installed, look at the other machine
    when it runs elsewhere; and always how to do without spam checking instead."""
    from appliance.spam.content_service import ContentStatus
    from appliance.status_checks import content_filter_fix

    fix = content_filter_fix(ContentStatus(True, False, problem, scanner), lambda name: installed and name == "rspamd")
    assert says in fix
    assert never not in fix
    assert fix.endswith("If you do not want spam checking, switch the content filter off in the spam settings.")
