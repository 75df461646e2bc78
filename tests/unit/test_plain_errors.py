"""Library error texts in plain words for the web pages (issue 10 item 16)."""

from __future__ import annotations

import time

import pytest

from appliance.plain_errors import plain, queue_error


@pytest.mark.parametrize(("raw", "words"), [
    ("relay.example.test[127.0.0.1]: TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: unable to get local issuer certificate (_ssl.c:1006)", "not signed by an authority this box trusts"),
    ("TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate "
     "(_ssl.c:1006)", "not signed by an authority this box trusts"),
    ("TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired "
     "(_ssl.c:1006)", "its certificate has expired"),
    ("TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
     "certificate is not valid for 'smtp.example.net'. (_ssl.c:1006)", "for another name, not smtp.example.net"),
    ("TLS handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
     "did not answer in TLS on this port"),
    ("connection failed: [Errno 111] Connection refused", "nothing accepts connections on that port"),
    ("connection failed: [Errno -2] Name or service not known", "could not be looked up in DNS"),
    ("connection failed: timed out", "no answer in time"),
    ("the lookup failed: NoNameservers", "no DNS server answered"),
    ("the lookup failed: Timeout", "DNS did not answer in time"),
    ("connection failed: Connection unexpectedly closed", "the server closed the connection"),
    ("cannot read the CA file /etc/x.pem: [Errno 2] No such file or directory: '/etc/x.pem'",
     "/etc/x.pem: the file does not exist"),
])
def test_library_errors_become_plain_words(raw: str, words: str) -> None:
    shown = plain(raw)
    assert words in shown
    assert "[SSL" not in shown
    assert "_ssl.c" not in shown
    assert "Errno" not in shown


def test_other_text_is_kept() -> None:
    assert plain("relay refused our login: 535 5.7.8 bad credentials") == "relay refused our login: 535 5.7.8 bad credentials"
    assert plain("outbound mail goes through the relay relay.example.test:587 (starttls)") == \
        "outbound mail goes through the relay relay.example.test:587 (starttls)"


@pytest.mark.parametrize(("stored", "shown"), [
    ("mx.example.net[203.0.113.5]:25: connection failed: [Errno 111] Connection refused",
     "connection refused by mx.example.net (203.0.113.5) port 25"),
    ("mx.example.net[203.0.113.5]: connection failed: [Errno 111] Connection refused",  # a row from before the port
     "connection refused by mx.example.net (203.0.113.5)"),
    ("mx.example.net[203.0.113.5]:25: connection failed: timed out",
     "timed out connecting to mx.example.net (203.0.113.5) port 25"),
    ("mx[2001:db8::1]:25: connection failed: [Errno 101] Network is unreachable; mx[203.0.113.5]:25: connection "
     "failed: [Errno 110] Connection timed out (gave up after 5 days)",
     "cannot reach the network of mx (2001:db8::1) port 25 (no IPv6 here?); timed out connecting to mx "
     "(203.0.113.5) port 25 (gave up after 5 days)"),
    ("mx[203.0.113.5]:25: connection failed: [Errno 99] Cannot assign requested address",
     "cannot connect to mx (203.0.113.5) port 25: cannot assign requested address"),
    ("mx[203.0.113.5]:25: refused to talk to me: 554 5.3.2 no service; come back later",
     "mx (203.0.113.5) port 25: refused to talk to me: 554 5.3.2 no service; come back later"),
    ("connection lost: [Errno 104] Connection reset by peer",
     "connection lost during the transaction: the server broke off the connection"),
    ("connection lost: timed out", "connection lost during the transaction: timed out"),
    ("550 5.1.1 <bob@example.net>: Recipient address rejected", "550 5.1.1 <bob@example.net>: Recipient address rejected"),
    ("no MX or A/AAAA record for example.net", "no MX or A/AAAA record for example.net"),
])
def test_queue_errors_are_sentences(stored: str, shown: str) -> None:
    assert queue_error(stored) == shown


def _reply(line: str) -> str:
    """A remote server's reply as the queue stores it: up to 100 lines of up to 8 KiB within 64 KiB
    (queue/client.py's bounds), each stripped, joined by a space."""
    return "450 4.2.0 " + " ".join([line[:8000]] * 8)


@pytest.mark.parametrize("reply", [
    _reply("a" + " " * 7990 + "b"),  # whitespace runs: the gave-up suffix's \s* tried at each of their spaces
    _reply("; a[" * 2000),  # a hop's start at each '; ', its address read to the end of the text
    _reply("(gave up after " * 530),  # the suffix's start again and again, each read to the end
])
def test_a_remote_reply_is_shown_in_linear_time(reply: str) -> None:
    """A remote MX's reply is a queue row's last error, which the console's Sending page renders on the
    event loop every box protocol shares: 0.3 to 0.6 s of CPU per row before (quadratic scans)."""
    started = time.process_time()
    queue_error(reply)
    assert time.process_time() - started < 0.05
