"""The box's run-time settings as one typed object: the only module that knows their keys in the
`settings` table and how each value is written there.

Every service and the web read the fields (`(await settings.fresh()).hold`, `settings.now.hostname`)
and write through `settings.save(hold=True, ...)`; nobody keeps a copy. Values are live:

- a change saved through this object is in force at once for every service of this process (the
  snapshot is replaced before `save` returns, and subscribers are told);
- a change committed by another process (the `letterbox` CLI writing the same SQLite file while
  `serve` runs) is seen at the next `fresh()`: SQLite's `PRAGMA data_version` changes whenever
  another connection commits (https://sqlite.org/pragma.html#pragma_data_version), so checking it
  before serving the cached snapshot costs one cheap statement, and the snapshot is re-read only
  when something changed. Writes through this process's own connection (`Database.set_setting`,
  used by tests and older code) bump `Database.settings_generation`, checked the same way.
  Since migration 0018 the check is the `settings` change counter instead, which a trigger raises
  with every change of the table by any connection and which is read without a round trip to
  aiosqlite's thread (`Database.counters`; issue 19: two round trips per SMTP message otherwise);
  data_version stays the fallback when the counter cannot be read.

Services that must react to a change (the queue waking up for a new relay) `subscribe` once; the
callback runs after any reload that changed a value, whoever made the change.

The spam layers' settings (issue 16) are one nested value, `SettingValues.spam` (a `SpamSettings`),
stored as `spam_<field>` rows and written whole: `settings.save(spam=replace(now.spam, greylist=False))`.

Not here: per-domain state that happens to live in the same table (DKIM selectors `dkim_selector:*`,
DNS check results `dns_check:*`), the store's UIDVALIDITY counter, and the certificate module's ACME
state; each is owned by its module.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypedDict, Unpack, cast

from appliance.db import Database
from appliance.queue.retry import RetryOverrides, parse_overrides
from appliance.queue.smarthost import DEFAULT_PORTS, Smarthost, SmarthostError

log = logging.getLogger("letterbox.settings")

# --- the keys (nowhere else) -----------------------------------------------------------------------------
HOSTNAME = "hostname"
DELIVERY_LOG = "delivery_log"  # on/off
DELIVERY_LOG_DAYS = "delivery_log_days"
PORT25_PROBE = "port25_probe"  # host:port the status check connects to
STATUS_CHECKS = "status_checks"  # on/off: the status checklist's background runs
TIME_ZONE = "time_zone"  # IANA name; empty: the system's (appliance/time_zone.py)
PUBLIC_IPV4 = "public_ipv4"
PUBLIC_IPV6 = "public_ipv6"
QUEUE_HOLD = "queue_hold"  # "1": keep everything queued, deliver nothing (tests, maintenance)
MX_PORT = "outbound_port"  # the port of other domains' mail servers; 25 except in tests
RETRY_INTERVALS = "queue_retry_intervals"  # comma-separated seconds; the last one repeats
RETRY_MAX_AGE = "queue_max_age"
RETRY_DELAY_NOTICE = "queue_delay_notice"  # 0 turns delay notices off
DNS_RESOLVER = "dns_resolver"  # address[:port]; empty: the system's resolver
# {service: port} of the SRV records, JSON, written by `serve` at each start (its --port-offset), so
# `letterbox dns records|check|zone` in another process name the ports the console names.
PUBLISHED_PORTS = "published_ports"
INBOUND_AUTH = "inbound_auth"  # "off": no SPF/DKIM/DMARC checks, no header (the default is on)
DMARC_REJECT = "dmarc_reject"  # "off": a p=reject failure is delivered, marked, not refused
RELAY_HOST = "smarthost_host"  # empty or absent: deliver directly to each domain's MX
RELAY_PORT = "smarthost_port"  # the relay's port (not MX_PORT): empty means 587/465 by TLS mode
RELAY_TLS = "smarthost_tls"  # 'starttls' (required, never plain) or 'implicit'
RELAY_USER = "smarthost_user"
RELAY_PASSWORD = "smarthost_password"  # noqa: S105  a key, not a secret. In clear: SASL PLAIN needs it; never logged or shown
RELAY_CA_FILE = "smarthost_ca_file"  # optional PEM bundle to trust instead of the system's
RELAY_TESTED = "smarthost_tested"  # Smarthost.describe() of the relay that last passed its test
SETUP_STEP = "setup_step"  # the furthest wizard step reached
SETUP_DONE = "setup_done"  # "1" once the wizard's last step was reached (a POST: step 6's Continue)
SETUP_DOMAIN = "setup_domain"  # the domain chosen in step 2
SETUP_DOMAIN_ADDED = "setup_domain_added"  # "1" when step 2 created it (a later step 2 may replace it)

SPAM_PREFIX = "spam_"  # + a SpamSettings field name: spam_dnsbl, spam_greylist_delay, ...

# --- the spam layers (issue 16) ------------------------------------------------------------------------
_LIST_NAME = re.compile(r"^(?=.{1,200}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")


@dataclass(frozen=True)
class SpamSettings:
    """Every knob of the spam and abuse defence, with the defaults a family never has to touch.

    Connection and envelope time (appliance/spam/: dnsbl.py, greylist.py, greeting.py), on the MX
    (port 25) only, never for a logged-in user:
    - `dnsbl`/`dnsbl_lists`: refuse (5xx naming the list) a client whose IP address is listed;
      `domain_blocklist`/`domain_lists`: the same for the envelope sender's domain. The lists are
      asked through the box's resolver (the `dns_resolver` setting, else the system's).
    - `early_talker`: refuse a client that sends before the greeting; `greeting_delay` seconds of
      waiting before the greeting (0: none) for clients without forward-confirmed reverse DNS.
    - `greylist`: 4xx the first attempt of each (client /24 or /64, sender, recipient) triplet;
      a retry after `greylist_delay` seconds passes, and the triplet is remembered
      `greylist_remember_days` days after its last use.
    - `skip_networks`: clients never checked by these layers (loopback by default: local programs
      and the box itself; tests set it to () to exercise the layers from 127.0.0.x).

    Content, at DATA (appliance/spam/content_filter.py): `content_filter` asks rspamd at `rspamd_url`;
    a score at or above `reject_score` is refused (5xx), at or above `junk_score` goes to Junk. Moves
    into and out of Junk teach rspamd at `rspamd_controller_url` (appliance/spam/learning.py).

    Outbound (submission): a user may send `outbound_messages_per_hour` messages and
    `outbound_recipients_per_hour` recipients an hour (0: no limit); `outbound_reject_burst` remote
    refusals of their recipients within an hour suspend their sending (0: never).

    `decisions_keep_days`: how long the recent-decisions log keeps its rows.
    """

    dnsbl: bool = True
    dnsbl_lists: tuple[str, ...] = ("zen.spamhaus.org",)
    domain_blocklist: bool = True
    domain_lists: tuple[str, ...] = ("dbl.spamhaus.org",)
    early_talker: bool = True
    greeting_delay: float = 3.0
    greylist: bool = True
    greylist_delay: int = 300
    greylist_remember_days: int = 35
    skip_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    content_filter: bool = True
    rspamd_url: str = "http://127.0.0.1:11333"
    rspamd_controller_url: str = "http://127.0.0.1:11334"  # where rspamd learns (moves into/out of Junk)
    junk_score: float = 6.0
    reject_score: float = 15.0
    outbound_messages_per_hour: int = 100
    outbound_recipients_per_hour: int = 300
    outbound_reject_burst: int = 20
    decisions_keep_days: int = 30

    def __post_init__(self) -> None:
        for name in ("dnsbl_lists", "domain_lists"):
            for item in getattr(self, name):
                if not _LIST_NAME.match(item):
                    raise ValueError(f"{item!r} is not a DNS list name (like zen.spamhaus.org)")
        for network in self.skip_networks:
            ipaddress.ip_network(network, strict=False)  # ValueError for anything else
        for url in (self.rspamd_url, self.rspamd_controller_url):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"the rspamd URL {url!r} is not an http(s) URL")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    value < 0 or not math.isfinite(value)):
                raise ValueError(f"{f.name} must be a number of 0 or more, not {value!r}")

    def skips(self, client_ip: str) -> bool:
        """Is this client exempt from the connection and envelope checks (skip_networks)?"""
        return _in_networks(client_ip, self.skip_networks)


# Asked at every MX connection: parsing the addresses was 3 % of the MX's CPU (issue 19). At most
# 1024 answers (an address and the setting's tuple, shared) are kept.
@functools.lru_cache(maxsize=1024)
def _in_networks(client_ip: str, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


SPAM_KEYS = tuple(SPAM_PREFIX + f.name for f in fields(SpamSettings))


def _parse_like(default: object, text: str) -> object:
    """A stored text read as the type of the field's default (ValueError when it does not fit)."""
    text = text.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("not on/off")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple):
        return tuple(item.lower() for item in re.split(r"[\s,]+", text) if item)
    return text


def _spam(raw: Mapping[str, str]) -> SpamSettings:
    defaults = SpamSettings()
    values: dict[str, object] = {}
    for f in fields(SpamSettings):
        text = raw.get(SPAM_PREFIX + f.name)
        if text is None:
            continue
        try:
            values[f.name] = _parse_like(getattr(defaults, f.name), text)
            SpamSettings(**{f.name: values[f.name]})  # type: ignore[arg-type]  # checked by __post_init__
        except (ValueError, TypeError) as exc:
            log.warning("ignoring the %s setting %r: %s", SPAM_PREFIX + f.name, text, exc)
            values.pop(f.name, None)
    return SpamSettings(**values)  # type: ignore[arg-type]  # each value was checked alone above


def _spam_rows(spam: SpamSettings) -> dict[str, str]:
    rows: dict[str, str] = {}
    for f in fields(spam):
        value = getattr(spam, f.name)
        if isinstance(value, bool):
            rows[SPAM_PREFIX + f.name] = _on_off(value)
        elif isinstance(value, tuple):
            rows[SPAM_PREFIX + f.name] = ", ".join(value)
        else:
            rows[SPAM_PREFIX + f.name] = str(value)
    return rows


RELAY_KEYS = (RELAY_HOST, RELAY_PORT, RELAY_TLS, RELAY_USER, RELAY_PASSWORD, RELAY_CA_FILE)
KNOWN_KEYS = (
    HOSTNAME, PUBLIC_IPV4, PUBLIC_IPV6, QUEUE_HOLD, MX_PORT, RETRY_INTERVALS, RETRY_MAX_AGE,
    RETRY_DELAY_NOTICE, DNS_RESOLVER, INBOUND_AUTH, DMARC_REJECT, *RELAY_KEYS, RELAY_TESTED,
    SETUP_STEP, SETUP_DONE, SETUP_DOMAIN, SETUP_DOMAIN_ADDED, TIME_ZONE, STATUS_CHECKS, PORT25_PROBE, DELIVERY_LOG, DELIVERY_LOG_DAYS, *SPAM_KEYS,
)

_SELECT_KNOWN = f"SELECT key, value FROM settings WHERE key IN ({','.join('?' * len(KNOWN_KEYS))})"  # noqa: S608  placeholders only
DEFAULT_MX_PORT = 25
_TRUE = ("1", "yes", "on", "true")
_FALSE = ("0", "off", "no", "false")


@dataclass(frozen=True)
class SettingValues:
    """One consistent reading of every setting, decoded. Invalid stored values (set by hand) fall back
    to the default with a warning, except the relay, whose problem is kept to be shown (`relay_problem`):
    mail must not silently go direct when the owner asked for a relay."""

    hostname: str  # the box's name: --hostname, else the setting, else the system's
    hostname_stored: bool  # False while the name is only the start-up default (never saved)
    public_ipv4: str | None  # None: never given (the wizard then offers what it detects)
    public_ipv6: str | None
    hold: bool
    mx_port: int
    retry: RetryOverrides
    dns_resolver: str | None  # None: the system's resolver
    inbound_auth: bool
    dmarc_reject: bool
    relay: Smarthost | None
    relay_problem: str  # why the stored relay is invalid; empty when it is fine
    relay_ca_file: str  # the stored relay's CA file, kept even when the relay itself is invalid
    relay_tested: str  # Smarthost.describe() of the last relay whose test passed
    setup_step: int | None  # None: the wizard never recorded a step
    setup_done: bool
    setup_domain: str
    setup_domain_added: bool
    spam: SpamSettings  # the spam and abuse layers (issue 16)
    time_zone: str = ""  # IANA name for times shown to people; "": the system's
    status_checks: bool = True  # the status checklist runs in the background every few hours
    # The remote MX the outbound port-25 check connects to (a big provider's, as Mail-in-a-Box does).
    port25_probe: str = "aspmx.l.google.com:25"
    delivery_log: bool = True  # every message in and out recorded (appliance/delivery_log.py)
    delivery_log_days: int = 30  # how long its rows are kept


class Changes(TypedDict, total=False):
    """What `Settings.save` takes: any subset of the writable fields, typed."""

    hostname: str
    public_ipv4: str | None  # None: never given (the wizard then offers what it detects)
    public_ipv6: str | None
    hold: bool
    mx_port: int | None  # None: back to 25
    dns_resolver: str | None
    inbound_auth: bool
    dmarc_reject: bool
    relay: Smarthost | None  # None: direct delivery (clears every relay key, CA file included)
    relay_tested: str
    setup_step: int
    setup_done: bool
    setup_domain: str
    setup_domain_added: bool
    spam: SpamSettings  # written whole: replace(now.spam, field=...)
    time_zone: str
    status_checks: bool
    port25_probe: str
    delivery_log: bool
    delivery_log_days: int


def _flag(raw: Mapping[str, str], key: str, default: bool) -> bool:
    value = raw.get(key, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def _int(raw: Mapping[str, str], key: str) -> int | None:
    text = raw.get(key, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("ignoring the %s setting %r: not a number", key, text)
        return None


def _resolver(raw: Mapping[str, str]) -> str | None:
    value = raw.get(DNS_RESOLVER, "").strip()
    if not value:
        return None
    # Imported here: the resolver module loads dnspython, which a CLI command reading settings never uses.
    from appliance.queue.resolver import parse_nameserver

    try:
        parse_nameserver(value)
    except ValueError:
        log.warning("ignoring the %s setting %r: not an address[:port]", DNS_RESOLVER, value)
        return None
    return value


def _relay(raw: Mapping[str, str]) -> tuple[Smarthost | None, str]:
    host = raw.get(RELAY_HOST, "").strip()
    if not host:
        return None, ""
    tls = raw.get(RELAY_TLS, "").strip().lower() or "starttls"
    port_text = raw.get(RELAY_PORT, "").strip()
    try:
        try:
            port = int(port_text) if port_text else DEFAULT_PORTS.get(tls, 587)
        except ValueError as exc:
            raise SmarthostError(f"the relay port {port_text!r} is not a number") from exc
        return Smarthost(
            host=host, port=port,
            tls=tls,  # type: ignore[arg-type]  # validated in __post_init__
            user=raw.get(RELAY_USER, "").strip(), password=raw.get(RELAY_PASSWORD, ""),
            ca_file=raw.get(RELAY_CA_FILE, "").strip(),
        ), ""
    except SmarthostError as exc:
        return None, str(exc)


def decode(raw: Mapping[str, str], *, default_hostname: str, hostname_override: str | None = None) -> SettingValues:
    """The typed reading of the raw rows (pure: unit-tested without a db)."""
    stored_name = raw.get(HOSTNAME, "").strip()
    relay, problem = _relay(raw)
    try:
        retry = parse_overrides(raw.get(RETRY_INTERVALS), raw.get(RETRY_MAX_AGE), raw.get(RETRY_DELAY_NOTICE))
    except ValueError as exc:
        # A bad setting must not stop delivery: keep the defaults (the console validates on input).
        log.warning("ignoring the queue retry settings: %s", exc)
        retry = RetryOverrides()
    mx_port = _int(raw, MX_PORT)
    return SettingValues(
        hostname=hostname_override or stored_name or default_hostname,
        hostname_stored=bool(stored_name),
        public_ipv4=raw[PUBLIC_IPV4].strip() if PUBLIC_IPV4 in raw else None,
        public_ipv6=raw[PUBLIC_IPV6].strip() if PUBLIC_IPV6 in raw else None,
        hold=_flag(raw, QUEUE_HOLD, False),
        mx_port=mx_port if mx_port is not None and 0 < mx_port < 65536 else DEFAULT_MX_PORT,
        retry=retry,
        dns_resolver=_resolver(raw),
        inbound_auth=_flag(raw, INBOUND_AUTH, True),
        dmarc_reject=_flag(raw, DMARC_REJECT, True),
        relay=relay,
        relay_problem=problem,
        relay_ca_file=raw.get(RELAY_CA_FILE, "").strip(),
        relay_tested=raw.get(RELAY_TESTED, ""),
        setup_step=_int(raw, SETUP_STEP),
        setup_done=raw.get(SETUP_DONE, "") == "1",
        setup_domain=raw.get(SETUP_DOMAIN, "").strip(),
        setup_domain_added=raw.get(SETUP_DOMAIN_ADDED, "") == "1",
        spam=_spam(raw),
        time_zone=raw.get(TIME_ZONE, "").strip(),
        status_checks=_flag(raw, STATUS_CHECKS, True),
        port25_probe=raw.get(PORT25_PROBE, "").strip() or "aspmx.l.google.com:25",
        delivery_log=_flag(raw, DELIVERY_LOG, True),
        delivery_log_days=max(1, min(_int(raw, DELIVERY_LOG_DAYS) or 30, 3650)),
    )


def _relay_rows(relay: Smarthost | None) -> dict[str, str]:
    rows = dict.fromkeys(RELAY_KEYS, "")
    if relay is not None:
        rows.update({
            RELAY_HOST: relay.host, RELAY_PORT: str(relay.port), RELAY_TLS: relay.tls,
            RELAY_USER: relay.user, RELAY_PASSWORD: relay.password, RELAY_CA_FILE: relay.ca_file,
        })
    return rows


def _on_off(value: object) -> str:
    return "on" if value else "off"


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _bit_of(value: object) -> str:
    return "1" if value else "0"


# field -> (key, how its value is written); the relay spans six keys (_relay_rows).
_ENCODINGS: dict[str, tuple[str, Callable[[object], str]]] = {
    "hostname": (HOSTNAME, _text),
    "public_ipv4": (PUBLIC_IPV4, _text),
    "public_ipv6": (PUBLIC_IPV6, _text),
    "hold": (QUEUE_HOLD, _bit_of),
    "mx_port": (MX_PORT, _text),
    "dns_resolver": (DNS_RESOLVER, _text),
    "inbound_auth": (INBOUND_AUTH, _on_off),
    "dmarc_reject": (DMARC_REJECT, _on_off),
    "relay_tested": (RELAY_TESTED, _text),
    "setup_step": (SETUP_STEP, _text),
    "setup_done": (SETUP_DONE, _bit_of),
    "setup_domain": (SETUP_DOMAIN, _text),
    "setup_domain_added": (SETUP_DOMAIN_ADDED, _bit_of),
    "time_zone": (TIME_ZONE, _text),
    "status_checks": (STATUS_CHECKS, _on_off),
    "port25_probe": (PORT25_PROBE, _text),
    "delivery_log": (DELIVERY_LOG, _on_off),
    "delivery_log_days": (DELIVERY_LOG_DAYS, _text),
}


def encode(changes: Changes) -> dict[str, str]:
    """The rows that `changes` writes (pure)."""
    rows: dict[str, str] = {}
    for name, value in changes.items():
        if name == "relay":
            rows.update(_relay_rows(value if isinstance(value, Smarthost) else None))
        elif name == "spam":
            assert isinstance(value, SpamSettings)
            rows.update(_spam_rows(value))
        else:
            key, write = _ENCODINGS[name]
            rows[key] = write(value)
    return rows


# --- the settings a person sets by name (`letterbox settings`): the names the README uses ---------------

class SettingError(ValueError):
    """An unknown setting name, or a value it does not take; the message says what is accepted."""


def _parse_flag(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(text)


def _parse_resolver(text: str) -> str | None:
    text = text.strip()
    if text.lower() in ("", "system"):
        return None
    from appliance.queue.resolver import parse_nameserver  # dnspython: only when a resolver is given

    parse_nameserver(text)
    return text


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def _parse_probe(text: str) -> str:
    """host:port, as check_port25 splits it (the last colon)."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host):
            raise
    return f"{host}:{int(port)}"


def _parse_days(text: str) -> int:
    days = int(text.strip())
    if not 1 <= days <= 3650:  # decode's clamp: the range a stored value is read within
        raise ValueError(text)
    return days


@dataclass(frozen=True)
class Settable:
    """One setting a person may set by name: its key (`name`), the field it writes, what it takes."""

    name: str
    field: str  # of SettingValues and Changes
    accepts: str  # what a value looks like (errors and `letterbox settings list`)
    does: str  # one line
    parse: Callable[[str], object]  # ValueError when the text does not fit
    plain: str  # what it does, for someone who is not a mail expert (the console's Settings page)

    @property
    def choices(self) -> tuple[str, ...]:
        """The values to pick from, for an on/off setting (a form's select); () for one typed in."""
        return ("on", "off") if self.parse is _parse_flag else ()

    def shown(self, values: SettingValues) -> str:
        value = getattr(values, self.field)
        if isinstance(value, bool):
            return _on_off(value)
        return "system" if value is None else str(value)


_ON_OFF = "on or off"
SETTABLE: dict[str, Settable] = {s.name: s for s in (
    Settable(DNS_RESOLVER, "dns_resolver", "an address[:port] such as 127.0.0.1:5353, or system",
             "the DNS server every lookup asks (MX, DNS checks, blocklists); system: /etc/resolv.conf's",
             _parse_resolver,
             "Where the box looks up internet names: other domains' mail servers, your DNS records, spam "
             "blocklists. Keep \"system\" (the computer's own setting) unless you run a DNS server of your own."),
    Settable(PORT25_PROBE, "port25_probe", "host:port such as aspmx.l.google.com:25",
             "the remote mail server the status check connects to, to tell whether outbound port 25 is open",
             _parse_probe,
             "A mail server on the internet the status page tries to reach, to tell whether your internet "
             "provider lets mail out. Change it only if that server cannot be reached from where you are."),
    Settable(STATUS_CHECKS, "status_checks", _ON_OFF,
             "the status checklist runs by itself 5 minutes after start and every 6 hours; Check now works either way",
             _parse_flag,
             "On: the status page checks the box by itself, 5 minutes after it starts and every 6 hours. "
             "Off: only when you press Check now."),
    Settable(DELIVERY_LOG, "delivery_log", _ON_OFF, "every message in and out is recorded in the delivery log",
             _parse_flag,
             "On: the delivery log notes every message in and out (who, when, what became of it). "
             "Off: nothing new is noted."),
    Settable(DELIVERY_LOG_DAYS, "delivery_log_days", "a whole number of days from 1 to 3650",
             "how long the delivery log keeps its rows", _parse_days,
             "How many days the delivery log keeps what it noted before deleting it."),
    Settable(QUEUE_HOLD, "hold", _ON_OFF, "keep all outbound mail queued, deliver nothing (maintenance)",
             _parse_flag,
             "On: mail to other domains waits in the queue and nothing is sent, e.g. while you fix a problem. "
             "Off: it is sent as usual, and what waited goes at once."),
)}


def parse_setting(name: str, text: str) -> Changes:
    """The change `letterbox settings set NAME VALUE` makes (pure); SettingError naming what is accepted."""
    settable = SETTABLE.get(name)
    if settable is None:
        raise SettingError(f"no setting {name!r}: the settable ones are {', '.join(SETTABLE)}")
    try:
        value = settable.parse(text)
    except ValueError:
        raise SettingError(f"{name} takes {settable.accepts}, not {text!r}") from None
    return cast(Changes, {settable.field: value})


Subscriber = Callable[[SettingValues, SettingValues], None]  # (before, after)


class Settings:
    """The live settings of one process, over its Database connection."""

    def __init__(self, db: Database, *, default_hostname: str, hostname_override: str | None = None) -> None:
        self._db = db
        self._default_hostname = default_hostname
        self._hostname_override = hostname_override  # --hostname: this run only, until a rename
        self._now: SettingValues | None = None
        # (how the change mark was read, its value, settings_generation) of _now
        self._seen: tuple[str, int, int] | None = None
        self._subscribers: list[Subscriber] = []
        self._lock = asyncio.Lock()

    @classmethod
    async def load(cls, db: Database, *, default_hostname: str, hostname_override: str | None = None) -> Settings:
        settings = cls(db, default_hostname=default_hostname, hostname_override=hostname_override)
        await settings.fresh()
        return settings

    @property
    def now(self) -> SettingValues:
        """The last reading, without a db round trip: for code that cannot await (a banner, a
        lambda). In-process changes are in it at once; another process's after the next fresh()."""
        if self._now is None:
            raise RuntimeError("Settings used before load()")
        return self._now

    async def fresh(self) -> SettingValues:
        """The settings as committed right now, by this process or any other."""
        mark = (*await self._change_mark(), self._db.settings_generation)
        if self._now is not None and mark == self._seen:
            return self._now
        async with self._lock:
            mark = (*await self._change_mark(), self._db.settings_generation)
            if self._now is None or mark != self._seen:
                await self._reload(mark)
        return self.now

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(before, after)` after every reload that changed a value; returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def save(self, **changes: Unpack[Changes]) -> SettingValues:
        """Write the given fields in one transaction; in force for every service when this returns."""
        rows = encode(changes)
        await self.fresh()  # subscribers' `before` is what was in force, not an older reading
        async with self._db.transaction() as tx:
            for key, value in rows.items():
                await tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        if "hostname" in changes:
            self._hostname_override = None  # a rename wins over --hostname from now on
        self._db.settings_generation += 1
        return await self.fresh()

    async def _change_mark(self) -> tuple[str, int]:
        """What moves when any connection changes the settings: migration 0018's counter (no round
        trip), else SQLite's data_version (moves with every commit of another connection)."""
        # Once per iteration of the event loop (ChangeCounters.read_this_tick): an MX message asks
        # twice in one (its checks' settings, the content filter's).
        counter = self._db.counters.read_this_tick("settings")
        if counter is not None:
            return "counter", counter
        row = await self._db.fetchone("PRAGMA data_version")
        return "data_version", int(row[0]) if row else 0

    async def _reload(self, mark: tuple[str, int, int]) -> None:
        rows = await self._db.fetchall(_SELECT_KNOWN, KNOWN_KEYS)
        raw = {str(r["key"]): str(r["value"]) for r in rows}
        before, after = self._now, decode(
            raw, default_hostname=self._default_hostname, hostname_override=self._hostname_override)
        self._now, self._seen = after, mark
        if before is not None and before != after:
            for callback in list(self._subscribers):
                try:
                    callback(before, after)
                except Exception:
                    log.exception("a settings subscriber failed")



async def read_settings(db: Database, *, default_hostname: str = "") -> SettingValues:
    """One reading for a short-lived caller (a CLI command, a one-off check): read at use, no cache."""
    return (await Settings.load(db, default_hostname=default_hostname)).now
