"""The smarthost (relay) setting: send all outbound mail through one server, with TLS and a login.

Many home connections block outbound port 25, so the box can hand everything to the provider's (or a
mail service's) submission server instead. Stored in the settings table; the password is kept there
in clear because the relay needs it in clear (SASL PLAIN/LOGIN), and it is never logged or shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.db import Database
from appliance.queue.client import RelayLogin

RelayTls = Literal["starttls", "implicit"]
RELAY_TLS_MODES: tuple[RelayTls, ...] = ("starttls", "implicit")
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "implicit": 465}  # RFC 6409, RFC 8314

SETTING_HOST = "smarthost_host"  # empty or absent: deliver directly to each domain's MX
SETTING_PORT = "smarthost_port"
SETTING_TLS = "smarthost_tls"  # 'starttls' (required, never plain) or 'implicit'
SETTING_USER = "smarthost_user"
SETTING_PASSWORD = "smarthost_password"  # noqa: S105  a settings key, not a secret
SETTING_CA_FILE = "smarthost_ca_file"  # optional PEM bundle to trust instead of the system's
ALL_SETTINGS = (SETTING_HOST, SETTING_PORT, SETTING_TLS, SETTING_USER, SETTING_PASSWORD, SETTING_CA_FILE)


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
        return RelayLogin(self.user, self.password) if self.user else None

    def describe(self) -> str:
        """For logs and the console: everything but the password."""
        who = f" as {self.user}" if self.user else ""
        return f"{self.host}:{self.port} ({self.tls}){who}"


async def load_smarthost(db: Database) -> Smarthost | None:
    """The relay in force, or None for direct delivery. An invalid stored value raises SmarthostError."""
    host = (await db.get_setting(SETTING_HOST) or "").strip()
    if not host:
        return None
    tls = (await db.get_setting(SETTING_TLS) or "starttls").strip().lower()
    port_text = (await db.get_setting(SETTING_PORT) or "").strip()
    try:
        port = int(port_text) if port_text else DEFAULT_PORTS.get(tls, 587)
    except ValueError as exc:
        raise SmarthostError(f"the relay port {port_text!r} is not a number") from exc
    return Smarthost(
        host=host,
        port=port,
        tls=tls,  # type: ignore[arg-type]  # validated in __post_init__
        user=(await db.get_setting(SETTING_USER) or "").strip(),
        password=await db.get_setting(SETTING_PASSWORD) or "",
        ca_file=(await db.get_setting(SETTING_CA_FILE) or "").strip(),
    )


async def save_smarthost(db: Database, relay: Smarthost | None) -> None:
    """Store (or, with None, clear) the relay; one transaction so a half-written relay never exists."""
    values = dict.fromkeys(ALL_SETTINGS, "")
    if relay is not None:
        values.update({
            SETTING_HOST: relay.host, SETTING_PORT: str(relay.port), SETTING_TLS: relay.tls,
            SETTING_USER: relay.user, SETTING_PASSWORD: relay.password, SETTING_CA_FILE: relay.ca_file,
        })
    async with db.transaction() as tx:
        for key, value in values.items():
            await tx.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
