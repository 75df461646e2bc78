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
        if not self.host or any(c.isspace() for c in self.host) or "/" in self.host:
            raise SmarthostError("the relay host must be a host name or address")
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
