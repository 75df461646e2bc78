"""What a mail client needs to know, and the three autoconfig formats that tell it: Thunderbird's
config-v1.1.xml, Outlook's autodiscover response, and Apple's .mobileconfig profile. Pure functions.

Only TLS-protected ports are offered as the first choice (RFC 8314 4: implicit TLS preferred), with the
STARTTLS ports listed after; never a plain-text login.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import STANDARD_PORTS

# The XML and plist writers are imported by the functions that answer a mail program's request: the
# wizard's last step imports this module for client_settings alone, at the box's start (issue 15).
if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
MAX_AUTODISCOVER_REQUEST = 16 * 1024  # an Outlook request is a few hundred bytes
_EMAIL_ELEMENT = re.compile(rb"<(?:\w+:)?EMailAddress>\s*([^<>\s]{3,320})\s*</(?:\w+:)?EMailAddress>", re.IGNORECASE)
CLIENT_SERVICES = ("imaps", "imap", "pop3s", "pop3", "submissions", "submission")


@dataclass(frozen=True)
class ClientSettings:
    hostname: str
    ports: Mapping[str, int]  # service name (config.STANDARD_PORTS keys) -> the port clients use

    def port(self, service: str) -> int:
        return self.ports.get(service, STANDARD_PORTS[service])

    def rows(self) -> list[tuple[str, str, int, str]]:
        """(what, server, port, security) for the settings table people type into a client."""
        h = self.hostname
        return [
            ("Incoming mail (IMAP)", h, self.port("imaps"), "SSL/TLS"),
            ("Incoming mail (IMAP, alternative)", h, self.port("imap"), "STARTTLS"),
            ("Incoming mail (POP3)", h, self.port("pop3s"), "SSL/TLS"),
            ("Outgoing mail (SMTP)", h, self.port("submissions"), "SSL/TLS"),
            ("Outgoing mail (SMTP, alternative)", h, self.port("submission"), "STARTTLS"),
        ]


def client_settings(
    hostname: str, configured: Callable[[str], int], listeners: Mapping[str, tuple[str, int, bool]] | None
) -> ClientSettings:
    """The ports clients should use: the ones actually bound when known (tests bind port 0), else the
    configured ones (standard + offset)."""
    ports: dict[str, int] = {}
    for service in CLIENT_SERVICES:
        bound = (listeners or {}).get(service)
        port = bound[1] if bound else configured(service)
        ports[service] = port if port else STANDARD_PORTS[service]
    return ClientSettings(hostname, ports)


# --- Thunderbird --------------------------------------------------------------------------------------

def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    import xml.etree.ElementTree as ET

    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def _server(parent: ET.Element, tag: str, kind: str, settings: ClientSettings, service: str, socket: str) -> None:
    server = _sub(parent, tag, type=kind)
    _sub(server, "hostname", settings.hostname)
    _sub(server, "port", settings.port(service))
    _sub(server, "socketType", socket)
    _sub(server, "authentication", "password-cleartext")  # inside TLS only
    _sub(server, "username", "%EMAILADDRESS%")


def thunderbird_config(domain: str, settings: ClientSettings) -> bytes:
    """Mozilla autoconfig 'clientConfig' version 1.1 for `domain`."""
    import xml.etree.ElementTree as ET

    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    _sub(provider, "domain", domain)
    _sub(provider, "displayName", f"{domain} mail ({settings.hostname})")
    _sub(provider, "displayShortName", domain)
    _server(provider, "incomingServer", "imap", settings, "imaps", "SSL")
    _server(provider, "incomingServer", "imap", settings, "imap", "STARTTLS")
    _server(provider, "incomingServer", "pop3", settings, "pop3s", "SSL")
    _server(provider, "outgoingServer", "smtp", settings, "submissions", "SSL")
    _server(provider, "outgoingServer", "smtp", settings, "submission", "STARTTLS")
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


# --- Outlook --------------------------------------------------------------------------------------------

def autodiscover_address(body: bytes) -> str | None:
    """The <EMailAddress> of an Outlook autodiscover request. The body is untrusted XML; one element is
    all that is needed, so it is found by pattern rather than by parsing entities and all."""
    if len(body) > MAX_AUTODISCOVER_REQUEST:
        return None
    m = _EMAIL_ELEMENT.search(body)
    if not m:
        return None
    try:
        return m.group(1).decode("ascii")
    except UnicodeDecodeError:
        return None


def autodiscover_response(address: str, display_name: str, settings: ClientSettings) -> bytes:
    import xml.etree.ElementTree as ET

    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE_NS)
    response = _sub(root, "Response", xmlns=AUTODISCOVER_OUTLOOK_NS)
    user = _sub(response, "User")
    _sub(user, "DisplayName", display_name or address)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for kind, service in (("IMAP", "imaps"), ("SMTP", "submissions")):
        protocol = _sub(account, "Protocol")
        _sub(protocol, "Type", kind)
        _sub(protocol, "Server", settings.hostname)
        _sub(protocol, "Port", settings.port(service))
        _sub(protocol, "DomainRequired", "off")
        _sub(protocol, "LoginName", address)
        _sub(protocol, "SPA", "off")
        _sub(protocol, "SSL", "on")
        _sub(protocol, "AuthRequired", "on")
        if kind == "SMTP":
            _sub(protocol, "UsePOPAuth", "on")  # the same login as for reading mail
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


# --- Apple ---------------------------------------------------------------------------------------------

def mobileconfig(address: str, display_name: str, settings: ClientSettings) -> bytes:
    """An (unsigned) configuration profile with one IMAP account; iOS and macOS ask for the password."""
    import plistlib
    import uuid

    reverse_host = ".".join(reversed(settings.hostname.split(".")))
    ident = f"{reverse_host}.letterbox.{address}"
    account: dict[str, Any] = {
        "EmailAccountDescription": address,
        "EmailAccountName": display_name or address,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": settings.hostname,
        "IncomingMailServerPortNumber": settings.port("imaps"),
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": address,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": settings.hostname,
        "OutgoingMailServerPortNumber": settings.port("submissions"),
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "PayloadDescription": f"Mail account {address}",
        "PayloadDisplayName": address,
        "PayloadIdentifier": f"{ident}.account",
        "PayloadType": "com.apple.mail.managed",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{ident}.account")).upper(),
        "PayloadVersion": 1,
    }
    profile: dict[str, Any] = {
        "PayloadContent": [account],
        "PayloadDescription": f"Mail settings for {address} on {settings.hostname}",
        "PayloadDisplayName": f"Mail: {address}",
        "PayloadIdentifier": ident,
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, ident)).upper(),
        "PayloadVersion": 1,
    }
    return plistlib.dumps(profile)
