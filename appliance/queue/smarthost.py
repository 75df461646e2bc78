"""The smarthost (relay) setting: send all outbound mail through one server, with TLS and a login.

Many home connections block outbound port 25, so the box can hand everything to the provider's (or a
mail service's) submission server instead. Stored in the settings table (appliance/settings.py); the password is kept there
in clear because the relay needs it in clear (SASL PLAIN/LOGIN), and it is never logged or shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from appliance.queue.client import RelayLogin

RelayTls = Literal["starttls", "implicit"]
RELAY_TLS_MODES: tuple[RelayTls, ...] = ("starttls", "implicit")
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "implicit": 465}  # RFC 6409, RFC 8314


class SmarthostError(ValueError):
    """An invalid relay setting; the message is fit for a form field or a terminal."""


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    tls: RelayTls = "starttls"
    user: str = ""
    password: str = field(default="", repr=False)
    ca_file: str = ""

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host) or "/" in self.host or not _name_or_address(self.host):
            raise SmarthostError("the relay host must be a host name or address")
        if ":" in self.host and not _is_ipv6(self.host.removeprefix("[").removesuffix("]")):
            # 'smtp.example.net:587' was taken as a name, and DNS was asked for it at every delivery.
            raise SmarthostError("the relay host is a name or address alone: give its port separately (--port)")
        if not 0 < self.port < 65536:
            raise SmarthostError("the relay port must be between 1 and 65535")
        if self.tls not in RELAY_TLS_MODES:
            raise SmarthostError("relay TLS must be 'starttls' or 'implicit'")
        if self.user and not self.password:
            raise SmarthostError("a relay user name needs a password")

    @property
    def login(self) -> RelayLogin | None:
        # Imported here: the settings (every CLI command, every page) hold a Smarthost, and only the
        # queue's delivery asks for its login, so the SMTP client (smtplib, ssl, dnspython) loads then.
        from appliance.queue.client import RelayLogin

        return RelayLogin(self.user, self.password) if self.user else None

    def describe(self) -> str:
        """For logs and the console: everything but the password."""
        who = f" as {self.user}" if self.user else ""
        return f"{self.host}:{self.port} ({self.tls}){who}"


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _name_or_address(host: str) -> bool:
    """Brackets only around an IPv6 address ('[::1]'); a name's port is told apart by the caller."""
    if host.startswith("[") or host.endswith("]"):
        return host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1])
    return True
