"""What the CA says, in plain words: the mapping from ACME problem documents (RFC 8555 6.7) and failed
challenges to the messages the console and the CLI show."""

from __future__ import annotations

import datetime as dt

import pytest
import requests
from acme import challenges, errors, messages

from appliance.acme_client import TLSALPN01, explain

DIRECTORY = "https://ca.example/dir"


def acme_error(code: str, detail: str) -> messages.Error:
    error = messages.Error.from_json({"type": f"urn:ietf:params:acme:error:{code}", "detail": detail})
    assert isinstance(error, messages.Error)
    return error


def failed(name: str, typ: str, detail: str, chall: challenges.Challenge | None = None) -> errors.ValidationError:
    challenge = messages.ChallengeBody(
        chall=chall or challenges.HTTP01(token=b"t" * 16), status=messages.STATUS_INVALID,
        error=acme_error(typ, detail))
    authz = messages.AuthorizationResource(uri="https://ca.example/authz/1", body=messages.Authorization(
        identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name),
        challenges=[challenge], status=messages.STATUS_INVALID))
    return errors.ValidationError([authz])


@pytest.mark.parametrize(("typ", "detail", "expected"), [
    ("connection", "127.0.0.1: Connecting to 127.0.0.1:80: connection refused",
     "could not connect to mail.example.org on port 80 (connection refused): open port 80 on your router"),
    # A CI run's pebble: a random port starting with 443 and a token holding "tls" are still port 80.
    ("connection", 'Fetching http://mail.example.org:44335/.well-known/acme-challenge/aTlsZ: dial tcp '
                   '127.0.0.1:44335: connect: connection refused',
     "could not connect to mail.example.org on port 80 (connection refused): open port 80 on your router"),
    ("dns", "DNS problem: NXDOMAIN looking up A for mail.example.org",
     "could not find mail.example.org in the DNS"),
    ("unauthorized", "The key authorization file from the server did not match this challenge",
     "did not find this box's answer there: the name probably points at another machine"),
    ("connection", "Fetching http://mail.example.org/.well-known/acme-challenge/x: Timeout during connect",
     "timed out: port 80 (or 443) is probably not forwarded to this box"),
])
def test_failed_challenge_in_plain_words(typ: str, detail: str, expected: str) -> None:
    problem = explain(failed("mail.example.org", typ, detail), DIRECTORY)
    assert problem.kind == "validation"
    assert expected in problem.message


def test_refused_tls_alpn_challenge_names_port_443() -> None:
    error = failed("mail.example.org", "connection", "127.0.0.1:5001: connect: connection refused",
                   TLSALPN01(token=b"t" * 16))
    assert "on port 443 (connection refused): open port 443" in explain(error, DIRECTORY).message


def test_ca_errors_in_plain_words() -> None:
    now = dt.datetime.now(dt.UTC)
    limited = acme_error("rateLimited", "too many certificates (5) already issued for this exact set of identifiers")
    limited.retry_after = now + dt.timedelta(hours=3)
    problem = explain(limited, DIRECTORY)
    assert problem.kind == "rate-limit"
    assert "rate limit was reached" in problem.message
    assert "Try again in about 2 h 59 min" in problem.message or "Try again in about 3 h 0 min" in problem.message
    eab = acme_error("externalAccountRequired", "EAB required")
    assert explain(eab, DIRECTORY).kind == "eab"
    unreachable = explain(requests.exceptions.ConnectionError("refused"), DIRECTORY)
    assert unreachable.message.startswith(f"The certificate authority at {DIRECTORY} cannot be reached")
    other = explain(acme_error("serverInternal", "oops"), DIRECTORY)
    assert other.message == "The certificate authority answered with an error (serverInternal): oops"
