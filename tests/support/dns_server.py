"""A small authoritative DNS server on 127.0.0.1 for tests (UDP and TCP on one port), built on dnspython.

Serves exactly the records it is given; NXDOMAIN for unknown names, NOERROR/empty for known names with
another type. Runs on its own thread so blocking and async code under test can both query it.
"""

from __future__ import annotations

import socketserver
import struct
import threading
from collections import defaultdict

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = dict[tuple[str, str], list[str]]


def _key(name: str, rdtype: str) -> tuple[str, str]:
    return (dns.name.from_text(name).to_text().lower(), rdtype.upper())


class ZoneServer:
    """records: {(name, rdtype): [rdata text, ...]}, e.g. {("example.test", "MX"): ["10 mx.example.test."]}."""

    def __init__(self, records: Records | None = None, ttl: int = 60, negative_ttl: int | None = None) -> None:
        self.ttl = ttl
        # With negative_ttl, NXDOMAIN and NODATA answers carry an SOA whose MINIMUM (and TTL) is that
        # value, so resolvers may cache them (RFC 2308 3); without it they carry none.
        self.negative_ttl = negative_ttl
        self.queries = 0  # how many questions reached this server (caching tests count them)
        self.servfail = False  # answer everything with SERVFAIL (a broken upstream)
        self.silent = False  # answer nothing at all (a resolver that times out)
        self._records: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        for (name, rdtype), values in (records or {}).items():
            self.set(name, rdtype, values)
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None
        self.port = 0

    # --- zone contents -------------------------------------------------------------------------------
    def set(self, name: str, rdtype: str, values: list[str]) -> None:
        with self._lock:
            self._records[_key(name, rdtype)] = list(values)

    def remove(self, name: str, rdtype: str) -> None:
        with self._lock:
            self._records.pop(_key(name, rdtype), None)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        qname = question.name.to_text().lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        if self.servfail:
            with self._lock:
                self.queries += 1
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        with self._lock:
            self.queries += 1
            known = any(name == qname for name, _ in self._records)
            values = list(self._records.get((qname, qtype), []))
            cname = list(self._records.get((qname, "CNAME"), []))
        if values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, dns.rdataclass.IN, qtype, values)
            )
        elif cname and qtype != "CNAME":
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, dns.rdataclass.IN, "CNAME", cname)
            )
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        if not response.answer and self.negative_ttl is not None:
            zone = question.name.parent() if len(question.name) > 1 else question.name
            soa = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}"
            response.authority.append(
                dns.rrset.from_text_list(zone, self.negative_ttl, dns.rdataclass.IN, "SOA", [soa])
            )
        return response.to_wire()

    # --- serving -------------------------------------------------------------------------------------
    def start(self) -> int:
        zone = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                if zone.silent:
                    return
                sock.sendto(zone.answer(data), self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = self.request.recv(2)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                data = b""
                while len(data) < length:
                    chunk = self.request.recv(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                if zone.silent:
                    return
                reply = zone.answer(data)
                self.request.sendall(struct.pack("!H", len(reply)) + reply)

        # Bind UDP first on port 0, then TCP on the same number (retry if that one is taken).
        for _ in range(20):
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover
            raise OSError("no free port pair for the test DNS server")
        udp.daemon_threads = tcp.daemon_threads = True
        self._udp, self._tcp, self.port = udp, tcp, port
        for server in (udp, tcp):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            if server is not None:
                server.shutdown()
                server.server_close()

    def __enter__(self) -> ZoneServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

