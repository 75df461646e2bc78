"""The box's certificate: self-signed on first start, replaced by ACME or an upload, served by every
TLS listener from the next handshake on.

Every listener holds one stable server context (`TlsManager.context`) for the life of the process.
The certificate itself lives in a separate, fresh SSLContext per certificate (`TlsManager.current`),
built and checked before it goes live; each new handshake switches to the current one. Two traps of
the old design this avoids: a failed `load_cert_chain` on the live context left it broken, and loading
an RSA certificate onto the EC context kept both (TLS 1.3 clients still got the old one).

How the switch happens, per handshake, on public APIs only:
- asyncio (every listener: create_server(ssl=...), loop.start_tls for STARTTLS, uvicorn on 443) wraps
  each connection with `context.wrap_bio()`; our context returns an SSLObject whose first
  do_handshake() reads the ClientHello out of the incoming memory BIO (and puts it back), then sets
  `ssl_object.context` to the current certificate's context, or to a TLS-ALPN-01 challenge context
  when the client offers `acme-tls/1` for a name being validated (RFC 8737 3).
- a blocking `wrap_socket` (not used by the listeners) is covered by an sni_callback doing the same
  switch without the ALPN choice.
Open sessions keep the SSL object they were made with: a renewal drops nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import itertools
import json
import logging
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.client_hello import NotClientHello, parse_client_hello
from appliance.durable import replace_file

# cryptography is imported by the functions that make or read a certificate, not with this module, and
# the server calls them in a child process (appliance/child.py: new_self_signed, install_self_signed, check_in_child,
# _describe_saved): cryptography's Rust library alone is 9-10 MB of the box's RSS, kept for good once
# imported (issue 19: idle memory). A start reads its certificate's details from INFO_FILE. Only an ACME
# order (its client) and a TLS-ALPN-01 challenge certificate still load it in the server.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

SELF_SIGNED_DAYS = 825
CERT_FILE = "cert.pem"  # leaf first, then any chain
KEY_FILE = "key.pem"
INFO_FILE = "cert-info.json"  # CertificateInfo of cert.pem, with the SHA-256 of the cert.pem it describes
ACME_TLS_ALPN = "acme-tls/1"  # RFC 8737 6.2
MAX_PEM_BYTES = 256 * 1024  # an upload bigger than this is not a certificate chain


class CertificateProblem(ValueError):
    """A certificate that must not go live, with the reason in plain words (shown as is)."""


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    names: tuple[str, ...]
    self_signed: bool
    serial: int
    fingerprint: str  # SHA-256 of the leaf, hex

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before


def _new_key_pem() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


def self_signed_pem(hostname: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a self-signed EC P-256 certificate naming the box."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key, key_pem = _new_key_pem()
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
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def new_self_signed(hostname: str) -> tuple[bytes, bytes, CertificateInfo]:
    """self_signed_pem and its details, made in a child process (appliance/child.py): the server does
    not keep cryptography. Blocking."""
    from appliance import child

    made = child.call("appliance.tls:_self_signed_record", hostname)
    return made["cert"].encode(), made["key"].encode(), _info_from_record(made["info"])


def _self_signed_record(hostname: str) -> dict[str, Any]:
    """In the child: new_self_signed's answer."""
    from cryptography import x509

    cert_pem, key_pem = self_signed_pem(hostname)
    info = describe(x509.load_pem_x509_certificate(cert_pem))
    return {"cert": cert_pem.decode(), "key": key_pem.decode(), "info": _info_record(info)}


def _checked_self_signed_record(hostname: str) -> dict[str, Any]:
    """In the child: TlsManager.install_self_signed's pair, put through install's checks."""
    cert_pem, key_pem = self_signed_pem(hostname)
    full, info = inspect_certificate(cert_pem, key_pem, hostname=hostname)
    return {"full": full.decode(), "key": key_pem.decode(), "info": _info_record(info)}


def make_self_signed(hostname: str, cert_path: Path, key_path: Path) -> CertificateInfo:
    """A new self-signed pair in cert_path and key_path, its details in INFO_FILE beside them, so
    nothing reads the certificate with cryptography in the server afterwards. Blocking."""
    cert_pem, key_pem, info = new_self_signed(hostname)
    write_private(key_path, key_pem)
    write_private(cert_path, cert_pem, mode=0o644)
    save_info(cert_path.parent, cert_pem, info)
    return info


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomic and durable: a crash leaves the old file or the new one, never half of one."""
    replace_file(path, data, tmp=path.with_suffix(path.suffix + ".tmp"), mode=mode)


_write_private = write_private  # the old name, for callers not yet moved


def tls_alpn_challenge_pem(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """RFC 8737 3: a self-signed certificate for `name` carrying the critical acmeIdentifier extension
    (id-pe-acmeIdentifier 1.3.6.1.5.5.7.1.31) whose value is the DER OCTET STRING of the SHA-256 of
    the key authorization. (`acme` 5.x no longer ships this helper.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key, key_pem = _new_key_pem()
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    der = b"\x04\x20" + digest  # OCTET STRING, 32 bytes
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"), der), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- checking a certificate before it goes live --------------------------------------------------------

def _load_pem_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    from cryptography import x509

    if len(pem) > MAX_PEM_BYTES:
        raise CertificateProblem(f"The {what} is too large to be a certificate file.")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CertificateProblem(f"The {what} is not a PEM certificate (it should start with "
                                 "-----BEGIN CERTIFICATE-----).")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateProblem(f"The {what} could not be read: the PEM text is damaged.") from None


def name_covered(hostname: str, names: tuple[str, ...]) -> bool:
    """RFC 6125 6.4.3: exact match, or a wildcard in the left-most label only."""
    host = hostname.lower().rstrip(".")
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def describe(cert: x509.Certificate) -> CertificateInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n) for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        names=names,
        self_signed=cert.subject == cert.issuer,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def context_for(cert_pem: bytes, key_pem: bytes, workdir: Path | None = None) -> ssl.SSLContext:
    """A fresh server context holding exactly this certificate chain and key (the key must match).
    OpenSSL loads from files: they go in a private temporary directory under `workdir` (the box's
    tls/, so a key never lands in a shared /tmp) and are gone when this returns."""
    ctx = _server_context()
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cert_file, key_file = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        write_private(key_file, key_pem)
        write_private(cert_file, cert_pem)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
                raise CertificateProblem("The private key does not belong to this certificate.") from None
            raise CertificateProblem("The certificate or the private key could not be loaded "
                                     f"({exc.reason or exc}).") from None
        except ValueError:
            raise CertificateProblem("The private key could not be read (it must be an unencrypted PEM key).") from None
    return ctx


def check_certificate(
    cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"", *, hostname: str | None,
    now: dt.datetime | None = None, workdir: Path | None = None,
) -> tuple[bytes, ssl.SSLContext, CertificateInfo]:
    """Everything a new certificate must pass before it replaces a working one: readable, key matches,
    chain verifies link by link, valid now, covers the host name. Returns (full chain PEM, context,
    info); raises CertificateProblem with the reason in plain words. In this process: the server
    checks through check_in_child."""
    full, info = inspect_certificate(cert_pem, key_pem, chain_pem, hostname=hostname, now=now)
    return full, context_for(full, key_pem, workdir), info


def check_in_child(
    cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"", *, hostname: str | None,
    now: dt.datetime | None = None, workdir: Path | None = None,
) -> tuple[bytes, ssl.SSLContext, CertificateInfo]:
    """check_certificate with its cryptography part (inspect_certificate) in a child process
    (appliance/child.py), the key and the context checked here with the ssl module. Blocking."""
    from appliance import child

    checked = child.call("appliance.tls:_inspected_record", cert_pem.decode("ascii", "replace"),
                         key_pem.decode("ascii", "replace"), chain_pem.decode("ascii", "replace"), hostname,
                         now.isoformat() if now else None, expect=(CertificateProblem,))
    full = checked["full"].encode()
    return full, context_for(full, key_pem, workdir), _info_from_record(checked["info"])


def _inspected_record(cert_pem: str, key_pem: str, chain_pem: str, hostname: str | None,
                      now: str | None) -> dict[str, Any]:
    """In the child: check_in_child's answer."""
    full, info = inspect_certificate(cert_pem.encode(), key_pem.encode(), chain_pem.encode(), hostname=hostname,
                                     now=dt.datetime.fromisoformat(now) if now else None)
    return {"full": full.decode(), "info": _info_record(info)}


def inspect_certificate(
    cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"", *, hostname: str | None,
    now: dt.datetime | None = None,
) -> tuple[bytes, CertificateInfo]:
    """check_certificate's part that reads the certificates (cryptography): (full chain PEM, info)."""
    from cryptography.hazmat.primitives import serialization

    now = now or dt.datetime.now(dt.UTC)
    certs = _load_pem_chain(cert_pem, "certificate")
    if chain_pem.strip():
        certs += _load_pem_chain(chain_pem, "chain")
    if len(key_pem) > MAX_PEM_BYTES or b"PRIVATE KEY-----" not in key_pem:
        raise CertificateProblem("The private key is not a PEM private key (it should start with "
                                 "-----BEGIN PRIVATE KEY----- or -----BEGIN EC/RSA PRIVATE KEY-----).")
    leaf = certs[0]
    _check_key_type(leaf)
    for child, issuer in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(issuer)
        except Exception as exc:  # noqa: BLE001  InvalidSignature, ValueError (not an issuer), TypeError (key type)
            raise CertificateProblem(
                f"The chain does not verify: {child.subject.rfc4514_string()} was not issued by "
                f"{issuer.subject.rfc4514_string()} ({type(exc).__name__}).") from None
    for cert in certs:
        if cert.not_valid_after_utc <= now:
            which = "certificate" if cert is leaf else f"chain certificate {cert.subject.rfc4514_string()}"
            raise CertificateProblem(f"The {which} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC.")
        if cert.not_valid_before_utc > now + dt.timedelta(minutes=5):
            raise CertificateProblem(
                f"The certificate is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC): "
                "check the box's clock.")
    info = describe(leaf)
    if hostname and not name_covered(hostname, info.names):
        shown = ", ".join(info.names) or "no names"
        raise CertificateProblem(f"The certificate does not cover the host name {hostname} (it names {shown}).")
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), info


# The curves of the TLS signature algorithms mail programs and browsers offer (RFC 8446 4.2.3): a key
# on another curve (secp256k1, Brainpool) is loaded by OpenSSL, and then no handshake can be made.
TLS_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _check_key_type(leaf: x509.Certificate) -> None:
    """The certificate's key is one the box's clients take: RSA (its size checked by OpenSSL's security
    level when loaded) or ECDSA on a TLS curve. An Ed25519 or Ed448 certificate was installed and served,
    and Thunderbird, Apple Mail, Outlook and every web browser refuse it (only OpenSSL-based clients take
    it); a secp256k1 key left every TLS port, the console's included, without a handshake."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = leaf.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in TLS_CURVES:
            return
        raise CertificateProblem(f"The certificate's key is on the curve {key.curve.name}, which TLS clients do not "
                                 "offer: use a key on P-256 or P-384, or RSA.")
    kind = type(key).__name__.removeprefix("_").removesuffix("PublicKey")
    raise CertificateProblem(f"The certificate's key is {kind}, which most mail programs (Thunderbird, Apple Mail, "
                             "Outlook) and web browsers refuse: use an ECDSA (P-256 or P-384) or RSA certificate.")


# --- the per-handshake switch --------------------------------------------------------------------------

class _SwitchingSSLObject(ssl.SSLObject):
    """Chooses its certificate context from the ClientHello on the first do_handshake()."""

    _letterbox_choose: Callable[[ssl.SSLObject, bytes], bool] | None = None
    _letterbox_incoming: ssl.MemoryBIO | None = None

    def do_handshake(self) -> None:
        choose = self._letterbox_choose
        incoming = self._letterbox_incoming
        if choose is not None and incoming is not None:
            # MemoryBIO is a FIFO with nothing else in it yet: read what arrived, put it back unchanged.
            data = incoming.read()
            if data:
                incoming.write(data)
            if not choose(self, data):
                raise ssl.SSLWantReadError("the ClientHello is not complete yet")
            self._letterbox_choose = None
            self._letterbox_incoming = None
        super().do_handshake()


class SwitchingContext(ssl.SSLContext):
    """The one context every listener holds; the certificate comes from `manager` per handshake."""

    manager: TlsManager

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if server_side and isinstance(obj, _SwitchingSSLObject):
            obj._letterbox_choose = self.manager._choose
            obj._letterbox_incoming = incoming
        return obj


class TlsManager:
    """Owns tls/cert.pem + tls/key.pem, the current certificate's context, and the TLS-ALPN-01
    challenge contexts of an ACME order in progress."""

    def __init__(self, tls_dir: Path, hostname: str) -> None:
        self.dir = tls_dir
        self.hostname = hostname
        self.cert_path = tls_dir / CERT_FILE
        self.key_path = tls_dir / KEY_FILE
        self._lock = threading.Lock()  # install() runs in worker threads
        self._challenges: dict[str, ssl.SSLContext] = {}
        self.ensure_certificate()
        try:
            self.current = context_for(self.cert_path.read_bytes(), self.key_path.read_bytes(), self.dir)
        except CertificateProblem as exc:
            # A damaged pair on disk must not keep the box from starting: serve a new self-signed one.
            log.error("the saved certificate cannot be used (%s): making a self-signed one", exc)
            make_self_signed(hostname, self.cert_path, self.key_path)
            self.current = context_for(self.cert_path.read_bytes(), self.key_path.read_bytes(), self.dir)
        self._info = self._describe_saved(self.cert_path.read_bytes())
        self.context = self._outer_context()

    def _outer_context(self) -> SwitchingContext:
        ctx = SwitchingContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        ctx.sslobject_class = _SwitchingSSLObject
        ctx.manager = self
        # A context needs a certificate of its own to start a handshake; the switch replaces it.
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.sni_callback = self._sni_switch
        return ctx

    def _sni_switch(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        # Only for connections that the ClientHello switch did not handle (blocking wrap_socket).
        if sslobj.context is self.context:
            sslobj.context = self.current

    def _choose(self, sslobj: ssl.SSLObject, data: bytes) -> bool:
        """Pick the context for this connection; False while the ClientHello is incomplete."""
        try:
            hello = parse_client_hello(data)
        except NotClientHello:
            hello = None  # not TLS: the handshake fails on its own, with the current certificate
        else:
            if hello is None:
                return False
        chosen = self.current
        if hello is not None and ACME_TLS_ALPN in hello.alpn and hello.server_name:
            chosen = self._challenges.get(hello.server_name, chosen)
        sslobj.context = chosen
        return True

    def ensure_certificate(self) -> None:
        if not (self.cert_path.exists() and self.key_path.exists()):
            self.dir.mkdir(parents=True, exist_ok=True)
            make_self_signed(self.hostname, self.cert_path, self.key_path)
            log.info("made a self-signed certificate for %s in %s", self.hostname, self.dir)

    def reload(self) -> None:
        """Load tls/cert.pem + key.pem again (edited by hand). A pair that does not load leaves the
        working certificate in place and raises CertificateProblem."""
        cert_pem, key_pem = self.cert_path.read_bytes(), self.key_path.read_bytes()
        ctx = context_for(cert_pem, key_pem, self.dir)
        with self._lock:
            self.current = ctx
            self._info = self._describe_saved(cert_pem)
        log.info("certificate reloaded: %s", self._info.subject)

    def install(self, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"", *,
                hostname: str | None = None, now: dt.datetime | None = None) -> CertificateInfo:
        """Check, save and serve a new certificate (ACME, an upload). Nothing is written and nothing
        changes for the listeners unless every check passes. Blocking: call from a thread on the loop's
        behalf."""
        full, ctx, info = check_in_child(cert_pem, key_pem, chain_pem, hostname=hostname, now=now, workdir=self.dir)
        return self._serve(full, key_pem, ctx, info)

    def install_self_signed(self, hostname: str) -> CertificateInfo:
        """A new self-signed certificate for hostname, made and checked as install checks in one child
        process (two children cost the console's button about 0.3 s more), then saved and served.
        Blocking."""
        from appliance import child

        made = child.call("appliance.tls:_checked_self_signed_record", hostname)
        full, key_pem = made["full"].encode(), made["key"].encode()
        return self._serve(full, key_pem, context_for(full, key_pem, self.dir), _info_from_record(made["info"]))

    def _serve(self, full: bytes, key_pem: bytes, ctx: ssl.SSLContext, info: CertificateInfo) -> CertificateInfo:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Key first then certificate; a crash between the two leaves a mismatched pair, which the
            # next start detects (context_for fails) and replaces rather than refusing to start.
            write_private(self.key_path, key_pem)
            write_private(self.cert_path, full, mode=0o644)
            self.current = ctx
            self._info = info
            save_info(self.dir, full, info)
        log.info("certificate installed: %s, serial %x, until %s", info.subject, info.serial, info.not_after)
        return info

    def set_challenge(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        ctx = context_for(cert_pem, key_pem, self.dir)
        ctx.set_alpn_protocols([ACME_TLS_ALPN])  # RFC 8737 3: the only protocol negotiated
        self._challenges[name.lower().rstrip(".")] = ctx

    def clear_challenge(self, name: str) -> None:
        self._challenges.pop(name.lower().rstrip("."), None)

    def info(self) -> CertificateInfo:
        return self._info

    def _describe_saved(self, cert_pem: bytes) -> CertificateInfo:
        """cert.pem's details from INFO_FILE when it was written for these very bytes; otherwise read
        with cryptography (an edited or new cert.pem, a box from before INFO_FILE) and saved there."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads((self.dir / INFO_FILE).read_bytes())
            if saved["sha256"] == hashlib.sha256(cert_pem).hexdigest():
                return _info_from_record(saved)
        from appliance import child

        info = _info_from_record(child.call("appliance.tls:_described_record", cert_pem.decode("ascii", "replace")))
        save_info(self.dir, cert_pem, info)
        return info


def _described_record(cert_pem: str) -> dict[str, Any]:
    """In the child: the details of a certificate edited by hand (TlsManager._describe_saved)."""
    from cryptography import x509

    return _info_record(describe(x509.load_pem_x509_certificate(cert_pem.encode())))


def _info_record(info: CertificateInfo) -> dict[str, Any]:
    """CertificateInfo as JSON values (INFO_FILE, a child's answer)."""
    return dataclasses.asdict(info) | {"not_before": info.not_before.isoformat(),
                                       "not_after": info.not_after.isoformat()}


def _info_from_record(record: dict[str, Any]) -> CertificateInfo:
    return CertificateInfo(
        subject=record["subject"], issuer=record["issuer"],
        not_before=dt.datetime.fromisoformat(record["not_before"]),
        not_after=dt.datetime.fromisoformat(record["not_after"]),
        names=tuple(record["names"]), self_signed=bool(record["self_signed"]),
        serial=int(record["serial"]), fingerprint=record["fingerprint"])


def save_info(tls_dir: Path, cert_pem: bytes, info: CertificateInfo) -> None:
    """INFO_FILE for these cert.pem bytes: later starts read the details from it, not with cryptography."""
    record = _info_record(info) | {"sha256": hashlib.sha256(cert_pem).hexdigest()}
    try:
        write_private(tls_dir / INFO_FILE, json.dumps(record).encode(), mode=0o644)
    except OSError as exc:  # only a later start's cost: it reads cert.pem in a child again
        log.warning("cannot save the certificate's details in %s: %s", tls_dir / INFO_FILE, exc)
