"""Everything outbound through a relay that requires TLS and AUTH: a real aiosmtpd relay with an
authenticator and a certificate from the test CA (issue 7)."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from appliance.admin import Admin
from appliance.queue.smarthost import Smarthost
from tests.conftest import LETTERBOX
from tests.support.outbound import ALICE, MX1, PASSWORD, Outbound, outbound_fixture, zone_fixture  # noqa: F401
from tests.support.receivers import Receiver

RELAY_USER, RELAY_PASSWORD = "relay-user", "relay pass 5ecret!"
RELAY_NAME = "relay.example.test"


def relay_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(RELAY_NAME).configure_cert(ctx)
    return ctx


def use_relay(outbound: Outbound, tmp_path: Path, *, tls: str = "starttls", password: str = RELAY_PASSWORD) -> None:
    ca_file = tmp_path / "relay-ca.pem"
    outbound.ca.cert_pem.write_to_path(str(ca_file))
    outbound.zone.set(RELAY_NAME, "A", [MX1])
    relay = Smarthost(RELAY_NAME, outbound.port, tls, RELAY_USER, password, str(ca_file))  # type: ignore[arg-type]
    outbound.box.run(outbound.box.services.settings.save(relay=relay))
    outbound.wake()


def letterbox_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("letterbox"))


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_all_mail_goes_through_the_relay_with_tls_and_login(
    outbound: Outbound, tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="letterbox")
    use_relay(outbound, tmp_path, tls=tls)
    relay = Receiver(MX1, outbound.port, tls_context=relay_tls(outbound.ca), require_starttls=tls == "starttls",
                     implicit_tls=tls == "implicit", credentials={RELAY_USER: RELAY_PASSWORD})
    with relay:
        # No DNS records at all for the destinations: the relay is the only hop.
        outbound.submit(["a@far-away.test", "b@elsewhere.test"])
        transactions = relay.wait(2)
        outbound.wait_empty()
    assert sorted(t.rcpt_tos for t in transactions) == [("a@far-away.test",), ("b@elsewhere.test",)]
    assert all(t.login == RELAY_USER and t.tls and t.mail_from == ALICE for t in transactions)
    assert RELAY_PASSWORD not in letterbox_log(caplog)
    assert "relay=relay.example.test[127.0.0.2]" in letterbox_log(caplog)


def test_a_refused_login_defers_and_never_bounces(
    outbound: Outbound, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="letterbox")
    outbound.setting("queue_retry_intervals", "3600")  # one attempt only
    use_relay(outbound, tmp_path, password="wrong password")
    relay = Receiver(MX1, outbound.port, tls_context=relay_tls(outbound.ca), require_starttls=True,
                     credentials={RELAY_USER: RELAY_PASSWORD})
    with relay:
        outbound.submit(["a@far-away.test"])
        outbound.wait_until(lambda: any(r.attempts for m in outbound.messages() for r in m.recipients),
                            what="an attempt")
        assert relay.failed_logins >= 1
        assert relay.transactions == []
    [queued] = outbound.messages()
    [rcpt] = queued.recipients
    assert rcpt.state == "queued"
    assert "relay refused our login: 535" in rcpt.last_error
    assert outbound.inbox() == []
    assert "wrong password" not in letterbox_log(caplog)


def test_a_relay_without_starttls_never_gets_the_password(outbound: Outbound, tmp_path: Path) -> None:
    outbound.setting("queue_retry_intervals", "3600")  # one attempt only
    use_relay(outbound, tmp_path)
    with Receiver(MX1, outbound.port) as relay:  # plain text only
        outbound.submit(["a@far-away.test"])
        outbound.wait_until(lambda: any(r.attempts for m in outbound.messages() for r in m.recipients),
                            what="an attempt")
        assert relay.transactions == []
    [rcpt] = outbound.messages()[0].recipients
    assert rcpt.state == "queued"
    assert "does not offer STARTTLS" in rcpt.last_error


def test_relay_certificate_must_match_its_name(outbound: Outbound, tmp_path: Path) -> None:
    outbound.setting("queue_retry_intervals", "3600")  # one attempt only
    use_relay(outbound, tmp_path)
    wrong = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    outbound.ca.issue_cert("someone-else.test").configure_cert(wrong)
    with Receiver(MX1, outbound.port, tls_context=wrong, require_starttls=True,
                  credentials={RELAY_USER: RELAY_PASSWORD}) as relay:
        outbound.submit(["a@far-away.test"])
        outbound.wait_until(lambda: any(r.attempts for m in outbound.messages() for r in m.recipients),
                            what="an attempt")
        assert relay.transactions == []
        assert relay.failed_logins == 0
    [rcpt] = outbound.messages()[0].recipients
    assert rcpt.state == "queued"
    assert "TLS handshake failed" in rcpt.last_error


def test_settings_round_trip_and_the_password_stays_out_of_repr(outbound: Outbound) -> None:
    settings = outbound.box.services.settings
    relay = Smarthost("smtp.provider.test", 587, "starttls", "me", "pw-123")
    outbound.box.run(settings.save(relay=relay))
    assert outbound.box.run(settings.fresh()).relay == relay
    assert "pw-123" not in repr(relay)
    assert "pw-123" not in relay.describe()
    outbound.box.run(settings.save(relay=None))
    assert outbound.box.run(settings.fresh()).relay is None


def test_the_relay_is_set_shown_and_cleared_from_the_command_line(outbound: Outbound, tmp_path: Path) -> None:
    ca_file = tmp_path / "relay-ca.pem"
    outbound.ca.cert_pem.write_to_path(str(ca_file))
    outbound.zone.set(RELAY_NAME, "A", [MX1])

    def letterbox(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([LETTERBOX, "--data", str(outbound.box.data.root), "relay", *args],
                              input=stdin, capture_output=True, text=True, timeout=60)

    result = letterbox("set", RELAY_NAME, "--port", str(outbound.port), "--user", RELAY_USER,
                       "--password-stdin", "--ca-file", str(ca_file), stdin=RELAY_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"relay: {RELAY_NAME}:{outbound.port} (starttls) as {RELAY_USER} (set)\n"
    assert outbound.box.run(outbound.box.services.settings.fresh()).relay == Smarthost(
        RELAY_NAME, outbound.port, "starttls", RELAY_USER, RELAY_PASSWORD, str(ca_file))
    outbound.wake()
    relay = Receiver(MX1, outbound.port, tls_context=relay_tls(outbound.ca), require_starttls=True,
                     credentials={RELAY_USER: RELAY_PASSWORD})
    with relay:
        outbound.submit(["a@far-away.test"])
        [transaction] = relay.wait(1)
        outbound.wait_empty()
    assert transaction.login == RELAY_USER
    assert transaction.tls

    shown = letterbox("show")
    assert shown.stdout.startswith(f"relay: {RELAY_NAME}:")
    assert RELAY_PASSWORD not in shown.stdout + shown.stderr
    bad = letterbox("set", "no such/host")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "relay host" in bad.stderr
    assert letterbox("off").stdout.startswith("no relay")
    assert outbound.box.run(outbound.box.services.settings.fresh()).relay is None


def test_a_relay_that_is_this_box_itself_is_refused_not_gone_round(outbound: Outbound, tmp_path: Path) -> None:
    """The relay set to the box's own submission port (its own name typed as "the provider"): the
    relay test says so and the queue keeps the mail (4.4.6) until the setting is mended, as Postfix
    says "loops back to myself" of such a relayhost. Before, the test passed and each message went
    round through the box 49 times, using 49 of its sender's hourly sends, until 554 Too many hops."""
    ca_file = tmp_path / "box-ca.pem"
    outbound.ca.cert_pem.write_to_path(str(ca_file))
    relay = Smarthost("127.0.0.1", outbound.box.port("submission"), "starttls", ALICE, PASSWORD, str(ca_file))
    check = outbound.box.run(Admin.of(outbound.box.services).test_relay(relay))
    assert (check.ok, check.detail) == (False, "the relay 127.0.0.1 is this box itself: mail for it loops back to myself")
    outbound.box.run(outbound.box.services.settings.save(relay=relay))
    outbound.wake()
    outbound.submit(["someone@example.net"])
    outbound.wait_until(lambda: any("loops back to myself" in r.last_error for m in outbound.messages()
                                    for r in m.recipients), what="the loop to be found")
    [queued] = outbound.messages()  # the submitted message alone: it never went round
    assert queued.recipients[0].state == "queued"
    assert queued.recipients[0].last_error.startswith("the relay 127.0.0.1 is this box itself")


def test_a_relay_ca_file_that_cannot_be_used_defers_with_its_reason(
        outbound: Outbound, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The relay's CA file gone (or never one: set by hand, or before `letterbox relay set` checked it):
    each delivery's worker died with a FileNotFoundError traceback in the log and the message showed no
    error, retried at every poll. Now a deferral that says why, as any relay failure."""
    outbound.zone.set(RELAY_NAME, "A", [MX1])
    missing = tmp_path / "gone-ca.pem"
    relay = Smarthost(RELAY_NAME, outbound.port, "starttls", RELAY_USER, RELAY_PASSWORD, str(missing))
    outbound.box.run(outbound.box.services.settings.save(relay=relay))
    outbound.wake()
    with caplog.at_level(logging.ERROR, logger="letterbox"):
        outbound.submit(["a@far-away.test"])
        outbound.wait_until(lambda: any(r.last_error for m in outbound.messages() for r in m.recipients),
                            what="the deferral")
    [queued] = outbound.messages()
    assert queued.recipients[0].state == "queued"
    assert queued.recipients[0].last_error.startswith(f"cannot use the CA file {missing}: [Errno 2] No such file")
    assert not [r for r in caplog.records if r.exc_info], letterbox_log(caplog)
