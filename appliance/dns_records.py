"""The DNS records a domain needs to receive and send mail through this box, as a table a person copies.

One list serves the wizard, the console, `letterbox dns records` and the live checks (dns_check.py):
each record says what to create (type, name, value) and why, in words for someone who is not a mail
expert. `records_for` is pure; `domain_records` gathers its inputs (settings, DKIM key) for a domain.

Names and host names are written fully qualified without the trailing dot; record values that name a
host (MX, CNAME, SRV targets) carry the dot, as zone files and most DNS panels expect.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.reversename

from appliance import dkim_keys
from appliance.db import Database
from appliance.settings import PUBLISHED_PORTS, read_settings

SPF_VALUE = "v=spf1 mx -all"  # RFC 7208 5.4: the domain's MX hosts may send for it; nothing else may
DMARC_VALUE = "v=DMARC1; p=quarantine"  # RFC 7489 6.3: ask receivers to treat failing mail as suspect
MX_PREFERENCE = 10
# RFC 6186 3.1 / 3.2: priority 0, weight 1 for the one server of each kind.
SRV_PRIORITY = 0
SRV_WEIGHT = 1
# RFC 6186 / RFC 8314 5.1: the services a mail client looks up, with the box's listener of each.
SRV_SERVICES: tuple[tuple[str, str, str], ...] = (
    ("_submission._tcp", "submission", "sending mail (SMTP submission with STARTTLS)"),
    ("_imaps._tcp", "imaps", "reading mail over IMAP with TLS"),
    ("_pop3s._tcp", "pop3s", "downloading mail over POP3 with TLS"),
)
STANDARD_CLIENT_PORTS = {"submission": 587, "imaps": 993, "pop3s": 995}

# Route lookups for these never send a packet (UDP connect only picks the source address); they are
# documentation addresses (RFC 5737, RFC 3849), so nothing would answer anyway.
_PROBE_V4 = "192.0.2.1"
_PROBE_V6 = "2001:db8::1"

Where = Literal["zone", "provider"]


@dataclass(frozen=True)
class DnsRecord:
    """One row of the table. `value` None means "your public address" (not known yet)."""

    key: str  # stable id: "mx", "a", "spf", "dkim", "srv-imaps"...; checks and tests refer to it
    rdtype: str  # MX, A, AAAA, TXT, CNAME, SRV, PTR
    name: str  # fully qualified, no trailing dot
    value: str | None
    why: str
    where: Where = "zone"  # "provider": set by whoever gives you the address (PTR), not in your zone

    @property
    def shown_value(self) -> str:
        return self.value if self.value is not None else f"(your public IPv{6 if self.rdtype == 'AAAA' else 4} address)"

    def relative_name(self, zone: str) -> str | None:
        """The name as registrars' forms ask for it: '@' for the zone itself, 'mail' for mail.<zone>;
        None when the record does not belong in that zone (a host name elsewhere, a PTR)."""
        return relative_name(self.name, zone) if self.where == "zone" else None


def _fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


def relative_name(name: str, zone: str) -> str | None:
    """`name` relative to `zone` ('@' for the apex); None when it is not inside the zone."""
    name, zone = name.rstrip(".").lower(), zone.rstrip(".").lower()
    if name == zone:
        return "@"
    if name.endswith("." + zone):
        return name[: -len(zone) - 1]
    return None


def records_for(
    domain: str,
    hostname: str,
    *,
    ipv4: str | None = None,
    ipv6: str | None = None,
    dkim: dkim_keys.DkimKey | None = None,
    ports: Mapping[str, int] | None = None,
) -> list[DnsRecord]:
    """Every record for `domain` served by the box `hostname`, in the order a person creates them."""
    domain = domain.rstrip(".").lower()
    hostname = hostname.rstrip(".").lower()
    ports = {**STANDARD_CLIENT_PORTS, **(ports or {})}
    host_dot = _fqdn(hostname)
    rows: list[DnsRecord] = [
        DnsRecord("mx", "MX", domain, f"{MX_PREFERENCE} {host_dot}",
                  f"Mail for {domain} is delivered to this box ({hostname})."),
    ]
    if ipv4 or not ipv6:
        rows.append(DnsRecord("a", "A", hostname, ipv4,
                              f"Other servers and mail clients find {hostname} at this IPv4 address."))
    if ipv6:
        rows.append(DnsRecord("aaaa", "AAAA", hostname, ipv6,
                              f"The same for IPv6: {hostname} is reachable at this IPv6 address."))
    rows.append(DnsRecord("spf", "TXT", domain, SPF_VALUE,
                          f"SPF: only the mail servers of {domain} (this box) may send mail from {domain}; "
                          "receivers can refuse forgeries."))
    if dkim is not None:
        rows.append(DnsRecord("dkim", "TXT", dkim.record_name, dkim.txt_record(),
                              "DKIM: the public key receivers use to check the signature this box puts on "
                              "every message it sends. Paste it as one value; zone files split it into "
                              "quoted strings of at most 255 characters."))
    rows.append(DnsRecord("dmarc", "TXT", f"_dmarc.{domain}", DMARC_VALUE,
                          "DMARC: tells receivers to treat mail that fails SPF and DKIM as suspect "
                          "(spam folder)."))
    rows.append(DnsRecord("autoconfig", "CNAME", f"autoconfig.{domain}", host_dot,
                          "Thunderbird and other clients fetch their settings from here: users only type "
                          "their address and password."))
    rows.append(DnsRecord("autodiscover", "CNAME", f"autodiscover.{domain}", host_dot,
                          "The same for Outlook."))
    for label, service, what in SRV_SERVICES:
        rows.append(DnsRecord(f"srv-{service}", "SRV", f"{label}.{domain}",
                              f"{SRV_PRIORITY} {SRV_WEIGHT} {ports[service]} {host_dot}",
                              f"Tells mail clients where to connect for {what} (RFC 6186)."))
    for key, address in (("ptr", ipv4), ("ptr6", ipv6)):
        if address:
            rows.append(DnsRecord(key, "PTR", dns.reversename.from_address(address).to_text(omit_final_dot=True),
                                  host_dot,
                                  "Reverse DNS: ask whoever gives you this address (your ISP or hosting "
                                  f"provider) to set its name to {hostname}. Many receivers distrust mail "
                                  "from an address without it.", where="provider"))
    return rows


def format_table(records: Sequence[DnsRecord]) -> str:
    """The table as plain text for a terminal: one record a line, columns separated by two spaces."""
    rows = [("TYPE", "NAME", "VALUE")] + [(r.rdtype, r.name, r.shown_value) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{t:<{widths[0]}}  {n:<{widths[1]}}  {v}" for t, n, v in rows]
    notes = [f"  {r.rdtype} {r.name}: {r.why}" for r in records]
    return "\n".join([*lines, "", "Why:", *notes])


ZONE_TTL = 3600  # an hour: short enough to fix a mistake the same day, long enough to cache well


def _zone_value(record: DnsRecord) -> str:
    """The record's data in zone-file syntax (RFC 1035 5.1): TXT as quoted strings of at most 255
    characters each (RFC 7208 3.3, RFC 6376 3.6.2.2 join them back), quotes and backslashes escaped."""
    value = record.value or ""
    if record.rdtype != "TXT":
        return value
    escaped = [value[i:i + 255].replace("\\", "\\\\").replace('"', '\\"') for i in range(0, len(value), 255)] or [""]
    return " ".join(f'"{chunk}"' for chunk in escaped)


def zone_file(domain: str, records: Sequence[DnsRecord], *, ttl: int = ZONE_TTL) -> str:
    """A snippet to paste into (or import as) the zone of `domain`: names relative to $ORIGIN where
    they are inside it, fully qualified with the final dot where not; records that are not the zone
    owner's to create (PTR) or whose value is unknown yet (the public address) are commented out with
    the reason, so the file still loads."""
    zone = domain.rstrip(".").lower()
    lines = [f"; DNS records for {zone}, made by Letterbox. Import or paste into the zone {zone}.",
             f"$ORIGIN {zone}.", f"$TTL {ttl}"]
    for record in records:
        owner = relative_name(record.name, zone) or _fqdn(record.name)
        line = f"{owner:<32} IN {record.rdtype:<5} {_zone_value(record)}"
        if record.where == "provider":
            lines.append(f"; set by your provider, not in this zone: {owner} IN {record.rdtype} {record.value}")
        elif record.value is None:
            lines.append(f"; {owner} IN {record.rdtype} {record.shown_value}  <- enter the address and remove ';'")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


# --- inputs -----------------------------------------------------------------------------------------

_FIND_PUBLIC = ("The public address is the one the internet sees for your connection: your router's status "
                "page shows it (often as 'WAN' or 'Internet' address), or search 'what is my IP' from a "
                "computer on the same network. Your router must forward the mail ports to this box.")
_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in
                       ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598: carrier-grade NAT
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.ip_network("fc00::/7")  # RFC 4193


def _not_public_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why other mail servers could not reach this address, in plain words; None when they can."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"this is an IPv4 address written as IPv6: enter {ip.ipv4_mapped} as the IPv4 address instead"
    if ip.is_loopback or ip.is_unspecified:
        return f"{ip} means 'this machine itself' and is never reachable from other machines. {_FIND_PUBLIC}"
    if ip.is_link_local:
        return f"{ip} is a link-local address, valid only on the local network cable or Wi-Fi. {_FIND_PUBLIC}"
    if ip.is_multicast:
        return f"{ip} is a multicast (group) address, not the address of one machine. {_FIND_PUBLIC}"
    if any(ip in net for net in _DOCUMENTATION):
        return f"{ip} is an example address reserved for documentation, not a real one. {_FIND_PUBLIC}"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return (f"{ip} is a shared address of your internet provider (carrier-grade NAT): many customers sit "
                "behind one public address, and mail servers cannot reach this box through it. Ask your provider "
                "for a public IPv4 address, use IPv6 if your connection has it, or run the box on a rented server.")
    if isinstance(ip, ipaddress.IPv6Address) and ip in _ULA:
        return (f"{ip} is a unique local (private) IPv6 address, reachable only inside your own network. "
                "Enter the IPv6 address starting with 2 or 3 shown in your network settings, or leave IPv6 empty.")
    if any(ip in net for net in _RFC1918):
        return (f"{ip} is a private address, used only inside your home or office network: other mail servers "
                f"cannot reach it. {_FIND_PUBLIC}")
    if not ip.is_global:
        return f"{ip} is in a reserved range that is not reachable from the internet. {_FIND_PUBLIC}"
    return None


def valid_public_address(text: str, version: int) -> str:
    """The address in canonical form; ValueError (message for a form) when it cannot be the box's:
    every range that is not globally reachable (ipaddress's is_global: private, shared 100.64/10,
    loopback, link-local, documentation, reserved, ULA...) and multicast are refused, with why."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"not an IPv{version} address: {text.strip()[:60]!r}") from None
    if ip.version != version:
        raise ValueError(f"not an IPv{version} address: {text.strip()[:60]!r}")
    reason = _not_public_reason(ip)
    if reason:
        raise ValueError(reason)
    return str(ip)


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


def _route_source(family: socket.AddressFamily, probe: str) -> str | None:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))  # UDP connect sends nothing; it only asks the kernel for a route
            return str(s.getsockname()[0]).split("%")[0]
    except OSError:
        return None


def detect_public_addresses() -> tuple[str | None, str | None]:
    """(IPv4, IPv6) of this machine when they are public; None when behind NAT or absent, so the
    wizard asks. Looks only at the local routing table: no packet leaves the box."""
    found: list[str | None] = []
    for family, probe in ((socket.AF_INET, _PROBE_V4), (socket.AF_INET6, _PROBE_V6)):
        address = _route_source(family, probe)
        found.append(address if address and is_public(address) else None)
    return found[0], found[1]


async def public_addresses(db: Database) -> tuple[str | None, str | None]:
    """The addresses given in the wizard or console (settings), else none."""
    values = await read_settings(db)
    return values.public_ipv4 or None, values.public_ipv6 or None


async def served_ports(db: Database) -> dict[str, int]:
    """The SRV records' ports `serve` recorded at its last start (settings.PUBLISHED_PORTS); none before
    any start, or from a value that cannot be read: the standard ports then."""
    text = await db.get_setting(PUBLISHED_PORTS)
    try:
        stored = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(stored, dict):
        return {}
    return {service: port for service, port in stored.items()
            if service in STANDARD_CLIENT_PORTS and type(port) is int and 0 < port < 65536}


async def domain_records(
    db: Database, dkim_dir: Path, domain: str, hostname: str, ports: Mapping[str, int] | None = None
) -> list[DnsRecord]:
    """The table for one of the box's domains; makes its DKIM key if it has none yet. Without `ports`
    (a CLI process), the SRV records name the ports the box's last `serve` published."""
    if ports is None:
        ports = await served_ports(db)
    ipv4, ipv6 = await public_addresses(db)
    key = await dkim_keys.ensure_key(db, dkim_dir, domain)
    return records_for(domain, hostname, ipv4=ipv4, ipv6=ipv6, dkim=key, ports=ports)
