"""The box's certificate: self-signed on first start, one reloadable server SSLContext for every listener."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

SELF_SIGNED_DAYS = 825
CERT_FILE = "cert.pem"  # leaf first, then any chain
KEY_FILE = "key.pem"


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    not_after: dt.datetime
    names: tuple[str, ...]
    self_signed: bool


def make_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        sans.append(x509.DNSName("localhost"))
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_bytes)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TlsManager:
    """Owns tls/cert.pem + tls/key.pem. `context` is one object for the life of the process; reload()
    loads a new certificate into it, so listeners pick it up on their next handshake."""

    def __init__(self, tls_dir: Path, hostname: str) -> None:
        self.dir = tls_dir
        self.hostname = hostname
        self.cert_path = tls_dir / CERT_FILE
        self.key_path = tls_dir / KEY_FILE
        self.ensure_certificate()
        self.context = self._new_context()

    def ensure_certificate(self) -> None:
        if not (self.cert_path.exists() and self.key_path.exists()):
            self.dir.mkdir(parents=True, exist_ok=True)
            make_self_signed(self.hostname, self.cert_path, self.key_path)
            log.info("made a self-signed certificate for %s in %s", self.hostname, self.dir)

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def reload(self) -> None:
        self.context.load_cert_chain(self.cert_path, self.key_path)
        log.info("certificate reloaded: %s", self.info().subject)

    def install(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Replace the certificate (ACME, or an upload) and reload; the pair is checked first."""
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tmp_cert, tmp_key = self.dir / "new-cert.pem", self.dir / "new-key.pem"
        _write_private(tmp_key, key_pem)
        _write_private(tmp_cert, cert_pem, mode=0o644)
        try:
            probe.load_cert_chain(tmp_cert, tmp_key)
        except (ssl.SSLError, ValueError):
            tmp_cert.unlink(missing_ok=True)
            tmp_key.unlink(missing_ok=True)
            raise
        os.replace(tmp_key, self.key_path)
        os.replace(tmp_cert, self.cert_path)
        self.reload()

    def info(self) -> CertificateInfo:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(str(n) for n in san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        return CertificateInfo(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            not_after=cert.not_valid_after_utc,
            names=names,
            self_signed=cert.subject == cert.issuer,
        )
