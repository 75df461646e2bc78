"""Library error texts in plain words for the web pages (issue 10 item 16)."""

from __future__ import annotations

import pytest

from appliance.plain_errors import plain


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
