"""Debian's pebble (an ACME test CA) and pebble-challtestsrv (its DNS) on loopback, for one test.

Pebble's validator connects to httpPort/tlsPort from its config: they are set to the box's test
ports. Names resolve through challtestsrv, whose default answer is 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.conftest import require_program
from tests.support.polling import retry
from tests.support.ports import PORT_ATTEMPTS, PortTaken, free_ports, port_taken

EAB_KID = "kid-1"
EAB_HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"  # base64url


@dataclass
class Pebble:
    root: Path
    http_port: int
    tls_port: int
    nonce_reject: int = 0
    eab: bool = False
    validity_seconds: int | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def start(self) -> None:
        """Pebble and challtestsrv answering. Their ports are picked again when another process took one
        before it was bound (a CI-like loaded run: 'bind: address already in use' for the management
        port); a restart keeps its ports, and so its directory URL."""
        picked = not getattr(self, "port", 0)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if picked:
                self.port, self.management_port, self.dns_port, self.dns_management_port = free_ports(4)
            try:
                self._start_on_ports()
                return
            except PortTaken:
                if not picked or attempt == PORT_ATTEMPTS:
                    raise

    def _start_on_ports(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        server.private_key_and_cert_chain_pem.write_to_path(str(self.root / "server.pem"))
        server.cert_chain_pems[0].write_to_path(str(self.root / "cert.pem"))
        server.private_key_pem.write_to_path(str(self.root / "key.pem"))
        ca.cert_pem.write_to_path(str(self.root / "listener-ca.pem"))
        self.listener_ca = self.root / "listener-ca.pem"
        config: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.root / "cert.pem"),
            "privateKey": str(self.root / "key.pem"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab,
        }
        if self.eab:
            config["externalAccountMACKeys"] = {EAB_KID: EAB_HMAC}
        if self.validity_seconds:
            config["certificateValidityPeriod"] = self.validity_seconds
        (self.root / "pebble.json").write_text(json.dumps({"pebble": config}))
        log = open(self.root / "challtestsrv.log", "wb")  # noqa: SIM115  open for the process's life; closed in stop()
        self.logs.append(log)
        self.procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-management", f"127.0.0.1:{self.dns_management_port}",
             "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", ""],
            stdout=log, stderr=subprocess.STDOUT))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject))
        log = open(self.root / "pebble.log", "wb")  # noqa: SIM115  open for the process's life; closed in stop()
        self.logs.append(log)
        self.procs.append(subprocess.Popen(
            ["pebble", "-config", str(self.root / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        def ready() -> None:
            if any(p.poll() is not None for p in self.procs):
                said = (self.root / "pebble.log").read_text() + (self.root / "challtestsrv.log").read_text()
                raise (PortTaken if port_taken(said) else RuntimeError)("pebble did not start: " + said)
            self._get(f"https://127.0.0.1:{self.port}/dir")
            self._post_dns("/set-default-ipv6", {"ip": ""})

        try:
            retry(ready, retry_on=(OSError,), seconds=20, interval=0.1)
        except OSError:
            self.stop()
            raise RuntimeError("pebble did not start: " + (self.root / "pebble.log").read_text()) from None
        except BaseException:
            self.stop()  # its processes and logs are not left to the tests that follow in this worker
            raise
        (self.root / "pebble-root.pem").write_bytes(self._get(f"https://127.0.0.1:{self.management_port}/roots/0"))
        self.issuer_root = self.root / "pebble-root.pem"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def dns(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.listener_ca))
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:  # noqa: S310  a fixed https URL of the local pebble
            return bytes(resp.read())

    def _post_dns(self, path: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.dns_management_port}{path}",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310  a fixed http URL of the local challtestsrv
            resp.read()

    def set_a(self, host: str, address: str) -> None:
        self._post_dns("/add-a", {"host": host, "addresses": [address]})

    def restart(self) -> None:
        """Pebble forgets every account and order at restart (PEERS.md)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()


@contextmanager
def running_pebble(root: Path, http_port: int, tls_port: int, *, eab: bool = False) -> Iterator[Pebble]:
    """Pebble and its DNS started for the `with` block (the programs required), stopped afterwards."""
    require_program("pebble")
    require_program("pebble-challtestsrv")
    pebble = Pebble(root, http_port=http_port, tls_port=tls_port, eab=eab)
    pebble.start()
    try:
        yield pebble
    finally:
        pebble.stop()
