"""The ACME words the rest of the box uses (settings, problems, where challenge answers go), without
the `acme` library: that library, josepy and requests are about 9 MB of memory and 200 modules, needed
only while a certificate is ordered or its renewal window asked (appliance/acme_client.py, imported
then), not by a box that just runs (issue 19: idle memory)."""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"


class AcmeProblem(Exception):
    """An order that did not end in a certificate, with what went wrong in plain words."""

    def __init__(self, message: str, *, retry_after: dt.datetime | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.kind = kind


@dataclass
class ChallengeSink:
    """Where the answers go while an order runs (set from the worker thread, read by the listeners)."""

    set_http01: Callable[[str, str], None]
    clear_http01: Callable[[str], None]
    set_tls_alpn01: Callable[[str, str], None]  # (name, key authorization)
    clear_tls_alpn01: Callable[[str], None]


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETS_ENCRYPT
    email: str | None = None
    eab_kid: str | None = None
    eab_hmac_key: str | None = field(default=None, repr=False)  # a secret: kept out of any log or traceback
    ca_file: str | None = None  # a CA bundle for the directory's HTTPS (tests: pebble's own CA)
    challenge: str = HTTP_01  # the type answered when the CA offers it; the other one otherwise


@dataclass(frozen=True)
class Issued:
    fullchain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]


@dataclass
class Progress:
    report: Callable[[str, str], None] = field(default=lambda phase, text: None)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """RFC 9110 10.2.3: seconds, or an HTTP date."""
    if not value:
        return None
    now = now or dt.datetime.now(dt.UTC)
    value = value.strip()
    if value.isascii() and value.isdigit():
        return now + dt.timedelta(seconds=min(int(value), 30 * 86400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def ari_window(settings: AcmeSettings, acme_dir: Path, cert_pem: bytes) -> dt.datetime | None:
    """Blocking: the ARI renewal time (RFC 9773), or None (appliance/acme_client.py, imported here). A
    module-level function of this light module, so the renewer can hand it to the CPU pool's worker
    process without importing the ACME client itself (appliance/certificates.py, Renewer)."""
    from appliance import acme_client

    return acme_client.ari_window(settings, acme_dir, cert_pem)
