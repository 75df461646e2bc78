"""Network and TLS error texts in plain words, for the pages a person reads (the web console).

The queue, the relay test and the DNS check keep the library's exact text (logs and delivery reports
need it; a stored queue error may date from before this module); `plain` rewrites it where it is
shown: `[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer
certificate (_ssl.c:1006)` becomes "its certificate is not signed by an authority this box trusts
(self-signed, or from a private authority)". Text it does not know is kept, minus the C source
references that mean nothing to anyone.
"""

from __future__ import annotations

import re

# (pattern, replacement), applied in order; the patterns match the texts of ssl, socket, smtplib and
# dnspython as Python 3.11+ renders them.
_VERIFY = r"\[SSL: CERTIFICATE_VERIFY_FAILED\] certificate verify failed: "
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (_VERIFY + r"(unable to get local issuer certificate|self[- ]signed certificate( in certificate chain)?"
     r"|unable to verify the first certificate|unable to get issuer certificate)",
     "its certificate is not signed by an authority this box trusts (self-signed, or from a private "
     "authority: `letterbox relay set --ca-file` names one to trust)"),
    (_VERIFY + r"certificate has expired", "its certificate has expired"),
    (_VERIFY + r"certificate is not yet valid", "its certificate is not valid yet (check this box's clock)"),
    (_VERIFY + r"Hostname mismatch, certificate is not valid for '([^']*)'\.?",
     r"its certificate is for another name, not \1"),
    (_VERIFY + r"IP address mismatch, certificate is not valid for '([^']*)'\.?",
     r"its certificate is not valid for the address \1"),
    (_VERIFY + r"([^(]*)", r"its certificate was refused (\1)"),
    (r"\[SSL: WRONG_VERSION_NUMBER\] wrong version number",
     "the server did not answer in TLS on this port (a port for STARTTLS, such as 587, needs "
     "“STARTTLS”; a port for implicit TLS, such as 465, needs “Implicit TLS”)"),
    (r"\[SSL: (TLSV1_ALERT_PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|NO_PROTOCOLS_AVAILABLE)\][^(]*",
     "the server offers only old TLS versions, which this box refuses "),
    (r"\[SSL: (SSLV3_ALERT_HANDSHAKE_FAILURE|NO_SHARED_CIPHER|TLSV1_ALERT_[A-Z_]+)\][^(]*",
     "the server and this box found no common way to encrypt "),
    (r"\[SSL: [A-Z_]+\] ?", ""),
    (r"EOF occurred in violation of protocol", "the server closed the connection during the TLS handshake"),
    (r"(connection failed: )?\[Errno 111\] Connection refused", "connection refused: nothing accepts connections on that port "
     "(wrong port, the server is down, or a firewall refuses)"),
    (r"\[Errno 11[03]\] (Connection timed out|No route to host)",
     "no answer: a firewall drops the connection, or the host is down"),
    (r"\[Errno 101\] Network is unreachable", "this box has no route to that network (no IPv6, or no internet?)"),
    (r"\[Errno 104\] Connection reset by peer", "the server broke off the connection"),
    (r"\[Errno -[23]\] (Name or service not known|Temporary failure in name resolution)",
     "the name could not be looked up in DNS"),
    (r"\[Errno -5\] No address associated with hostname", "the name has no address in DNS"),
    (r"^timed out$|(?<=: )timed out", "no answer in time: a firewall may drop the connection, or the "
     "server is slow"),
    (r"Connection unexpectedly closed", "the server closed the connection"),
    (r"All nameservers failed to answer the query\.?|NoNameservers",
     "no DNS server answered (check this box's network and DNS settings)"),
    (r"The DNS operation timed out\.?|\bTimeout\b", "DNS did not answer in time"),
    (r"The DNS query name does not exist\.?", "the name does not exist in DNS"),
    (r"NoResolverConfiguration", "this box has no DNS server configured"),
    (r"\[Errno 2\] No such file or directory(: '[^']*')?", "the file does not exist"),
    (r"\[Errno 13\] Permission denied(: '[^']*')?", "the box may not read it (file permissions)"),
    (r" ?\(_ssl\.c:\d+\)", ""),
))


def plain(text: str) -> str:
    """`text` with every library error it contains in plain words."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


# A queue error names the host it is about: 'mx.example.net[203.0.113.5]:25: connection failed: [Errno 111]
# Connection refused' (the port since session 40; older rows have none). Several hops are joined by '; '.
# Bounded (an address in brackets is at most an IPv6 one; the suffix holds no parenthesis) and with no
# run of spaces before it: the text may be a remote server's reply of 64 KiB, and the scans were
# quadratic in it (0.3 to 0.6 s of CPU per row of the Sending page, rendered on the event loop).
_HOP = re.compile(r"(?P<name>[^\s\[\];]+)\[(?P<address>[^\]]{1,64})\](?::(?P<port>\d{1,5}))?: ")
_HOP_SPLIT = re.compile(r"; (?=[^\s\[\];]+\[[^\]]{1,64}\](?::\d{1,5})?: )")
_GAVE_UP = re.compile(r"\s?\(gave up after [^()]*\)$")
# What a socket said when connecting, as a sentence about `where` ('mx.example.net (203.0.113.5) port 25').
_CONNECT: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^\[Errno 111\] Connection refused$", "connection refused by {where}"),
    (r"^(timed out|\[Errno 110\] Connection timed out)$", "timed out connecting to {where}"),
    (r"^\[Errno 113\] No route to host$", "no route to {where} (the host is down, or a firewall drops it)"),
    (r"^\[Errno 101\] Network is unreachable$", "cannot reach the network of {where} (no IPv6 here?)"),
    (r"^\[Errno 104\] Connection reset by peer$", "connection reset by {where}"),
    (r"^Connection unexpectedly closed", "{where} closed the connection"),
))


def queue_error(text: str) -> str:
    """A queue recipient's last error as `letterbox queue list` and the console show it: 'connection refused
    by mx.example.net (203.0.113.5) port 25', 'no MX or A/AAAA record for example.net', a server's reply
    kept as it was. The stored text stays exact: delivery reports and logs carry it."""
    gave_up = _GAVE_UP.search(text)
    body = text[:gave_up.start()] if gave_up else text
    shown = "; ".join(_hop_sentence(part) for part in _HOP_SPLIT.split(body))
    return shown + (gave_up.group(0) if gave_up else "")


def _hop_sentence(text: str) -> str:
    hop = _HOP.match(text)
    if hop is None:
        if text.startswith("connection lost: "):  # mid-transaction (the hop is in the row's `remote`)
            return f"connection lost during the transaction: {_errno_words(text.removeprefix('connection lost: '))}"
        return _errno_words(text)
    where = f"{hop['name']} ({hop['address']})" + (f" port {hop['port']}" if hop["port"] else "")
    rest = text[hop.end():]
    if rest.startswith("connection failed: "):
        reason = rest.removeprefix("connection failed: ")
        for pattern, sentence in _CONNECT:
            if pattern.search(reason):
                return sentence.format(where=where)
        return f"cannot connect to {where}: {_errno_words(reason)}"
    return f"{where}: {_errno_words(rest)}"


def _errno_words(text: str) -> str:
    """`plain`, and an errno it has no sentence for as its words alone ('[Errno 99] Cannot assign
    requested address' -> 'cannot assign requested address')."""
    if text in ("timed out", "[Errno 110] Connection timed out"):
        return "timed out"
    return _ERRNO.sub(lambda m: m["words"][:1].lower() + m["words"][1:], plain(text))


_ERRNO = re.compile(r"\[Errno -?\d+\] (?P<words>[^:;]*)")
