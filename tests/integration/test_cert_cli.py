"""`letterbox cert ...`: uploads refused with a clear reason (mismatched key, a chain that doesn't verify,
expired, wrong name, garbage), a good one installed; status and self-signed; an order started by the
CLI is answered by the running box's port 80 and served by it without a restart."""

from __future__ import annotations

import datetime as dt
import os
import resource
import sqlite3
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from appliance.config import DataLayout
from tests.conftest import LETTERBOX, BoxHandle, preset_settings
from tests.support.pebble import EAB_HMAC, EAB_KID, Pebble, running_pebble
from tests.support.polling import retry
from tests.support.tls_probe import TLS_SERVICES, served_certificate

HOST = "mail.example.test"


def run(data: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(data), *args], capture_output=True, text=True, timeout=120,
                          input=stdin, env=None if env is None else {**os.environ, **env})


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("letterbox: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cert") / "data"
    layout = DataLayout(root)
    layout.create()
    preset_settings(layout, {"hostname": HOST})
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pems")
    root = trustme.CA()
    intermediate = root.create_child_ca()
    good = intermediate.issue_cert(HOST)
    other = intermediate.issue_cert(HOST)
    now = dt.datetime.now(dt.UTC)
    expired = intermediate.issue_cert(HOST, not_before=now - dt.timedelta(days=100), not_after=now - dt.timedelta(days=10))
    wrong = intermediate.issue_cert("other.example.test")
    stranger = trustme.CA().create_child_ca()
    made = {
        "leaf": good.cert_chain_pems[0].bytes(), "key": good.private_key_pem.bytes(),
        "chain": intermediate.cert_pem.bytes(), "other_key": other.private_key_pem.bytes(),
        "bad_chain": stranger.cert_pem.bytes(),
        "expired": expired.cert_chain_pems[0].bytes(), "expired_key": expired.private_key_pem.bytes(),
        "wrong": wrong.cert_chain_pems[0].bytes(), "wrong_key": wrong.private_key_pem.bytes(),
        "garbage": b"this is not a certificate\n\x00\xff",
    }
    for label, private in (("ed25519", ed25519.Ed25519PrivateKey.generate()),
                           ("k1", ec.generate_private_key(ec.SECP256K1()))):
        made[label], made[f"{label}_key"] = _self_signed(private)
    paths = {}
    for name, blob in made.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(blob)
    return paths


def _self_signed(private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """A certificate for HOST with a key of a kind trustme does not make."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False))
    cert = builder.sign(private, None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key


@pytest.mark.parametrize(("cert", "key", "chain", "message"), [
    # Installed and served before: Thunderbird, Apple Mail, Outlook and browsers refuse an Ed25519
    # certificate, and no TLS client can handshake with a secp256k1 key (the console's HTTPS included).
    ("ed25519", "ed25519_key", None, "the certificate's key is ed25519, which most mail programs"),
    ("k1", "k1_key", None, "the certificate's key is on the curve secp256k1, which tls clients do not offer"),
    ("leaf", "other_key", "chain", "the private key does not belong to this certificate"),
    ("leaf", "key", "bad_chain", "the chain does not verify"),
    ("expired", "expired_key", "chain", "the certificate expired on"),
    ("wrong", "wrong_key", "chain", "does not cover the host name mail.example.test (it names other.example.test)"),
    ("garbage", "key", None, "the certificate is not a pem certificate"),
    ("leaf", "garbage", "chain", "the private key is not a pem private key"),
    ("leaf", "key", "garbage", "the chain is not a pem certificate"),
])
def test_upload_refused_with_its_reason(data: Path, files: dict[str, Path], cert: str, key: str,
                                        chain: str | None, message: str) -> None:
    before = (DataLayout(data).tls / "cert.pem").read_bytes() if (DataLayout(data).tls / "cert.pem").exists() else None
    args = ["cert", "import", str(files[cert]), str(files[key])] + (["--chain", str(files[chain])] if chain else [])
    line = one_line_error(run(data, *args))
    assert message in line.lower(), line
    if before is not None:
        assert (DataLayout(data).tls / "cert.pem").read_bytes() == before


@pytest.mark.parametrize("args", [("cert", "import", "/dev/zero", "{key}"), ("cert", "import", "{leaf}", "/dev/zero"),
                                  ("cert", "import", "{leaf}", "{key}", "--chain", "/dev/zero"),
                                  ("cert", "request", "--eab-kid", "kid", "--eab-hmac-key-file", "/dev/zero")])
def test_a_file_without_end_is_read_only_as_far_as_it_could_matter(data: Path, files: dict[str, Path],
                                                                  args: tuple[str, ...]) -> None:
    """A certificate, key or chain file (or the EAB key's) was read whole before any check: /dev/zero, a
    device or a pipe that never ends took all the memory there was (here, under a 2 GiB address space,
    a MemoryError traceback). Now no more than could be one is read, and the answer is one line."""
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))

    argv = [arg.format(leaf=files["leaf"], key=files["key"]) for arg in args]
    result = subprocess.run([LETTERBOX, "--data", str(data), *argv], capture_output=True, text=True, timeout=120,
                            preexec_fn=limited)
    assert "too large" in one_line_error(result)


def test_good_upload_then_status_then_self_signed(data: Path, files: dict[str, Path]) -> None:
    result = run(data, "cert", "import", str(files["leaf"]), str(files["key"]), "--chain", str(files["chain"]))
    assert result.returncode == 0, result.stderr
    assert f"installed for {HOST}" in result.stdout
    status = run(data, "cert", "status")
    assert "source:       imported" in status.stdout
    assert HOST in status.stdout
    assert (DataLayout(data).tls / "key.pem").stat().st_mode & 0o777 == 0o600
    line = one_line_error(run(data, "cert", "renew"))
    assert "was not ordered through ACME" in line
    back = run(data, "cert", "self-signed")
    assert back.returncode == 0
    assert f"self-signed certificate for {HOST}" in back.stdout
    assert "mail programs warn" in run(data, "cert", "status").stdout


def point_at_pebble(box: BoxHandle, pebble: Pebble) -> None:
    """The box's settings for an order from pebble: its DNS server, a loopback public address, HOST."""
    async def settings() -> None:
        for key, value in {"dns_resolver": pebble.dns, "public_ipv4": "127.0.0.1", "hostname": HOST}.items():
            await box.services.db.set_setting(key, value)
    box.run(settings())


def test_cli_order_answered_by_running_box(box: BoxHandle, tmp_path: Path) -> None:
    with running_pebble(tmp_path / "pebble", box.port("http"), box.port("https")) as pebble:
        point_at_pebble(box, pebble)
        result = run(box.data.root, "cert", "request", "--directory", pebble.directory,
                     "--ca-file", str(pebble.listener_ca), "--email", "admin@example.test")
        assert result.returncode == 0, result.stderr
        assert f"issued for {HOST}" in result.stdout
        # The running box notices the new file and serves it on every port, without a restart.
        import ssl
        ctx = ssl.create_default_context(cafile=str(pebble.issuer_root))
        serials = retry(  # until the box picked up the certificate the CLI installed
            lambda: {served_certificate(box.port(s), s, ctx, server_hostname=HOST).serial_number for s in TLS_SERVICES},
            retry_on=(ssl.SSLCertVerificationError,), seconds=30, interval=0.5,
        )
        assert serials == {box.services.tls.info().serial}
        status = run(box.data.root, "cert", "status")
        assert "source:       acme" in status.stdout
        assert "next renewal:" in status.stdout


def test_cli_order_failure_is_one_plain_line(tmp_path: Path, data: Path) -> None:
    line = one_line_error(run(data, "cert", "request", "--directory", "https://127.0.0.1:9/dir"))
    # No DNS answer for the host name here (the system resolver): refused before asking any CA.
    assert "mail.example.test" in line or "cannot be reached" in line


def test_cli_challenge_failure_in_plain_words_old_certificate_kept(box: BoxHandle, tmp_path: Path) -> None:
    from tests.support.ports import free_port

    closed = free_port()  # port 80 "closed on the router": the CA's connection is refused
    with running_pebble(tmp_path / "pebble", closed, closed) as pebble:
        point_at_pebble(box, pebble)
        before = (box.data.tls / "cert.pem").read_bytes()
        line = one_line_error(run(box.data.root, "cert", "request", "--directory", pebble.directory,
                                  "--ca-file", str(pebble.listener_ca)))
        assert "could not connect to mail.example.test on port 80 (connection refused)" in line
        assert "open port 80 on your router" in line
        assert (box.data.tls / "cert.pem").read_bytes() == before
        status = run(box.data.root, "cert", "status").stdout
        assert "last error:" in status
        assert "connection refused" in status


WARNING = "letterbox: warning: --eab-hmac-key is visible to other users of this machine"


@pytest.mark.parametrize("source", ["file", "stdin", "environment", "flag"])
def test_eab_hmac_key_sources_stored_never_echoed(tmp_path: Path, data: Path, source: str) -> None:
    # The order fails before any CA is asked (no DNS for the host name here), after the settings given are
    # kept for renewals: the key stored is the one given, and it is in no output and no event.
    key = f"{source}-{EAB_HMAC}"
    (tmp_path / "hmac").write_text(f"{key}\n")
    args, stdin, env = {
        "file": (["--eab-hmac-key-file", str(tmp_path / "hmac")], None, None),
        "stdin": (["--eab-hmac-key-file", "-"], f"{key}\n", None),
        "environment": ([], None, {"LETTERBOX_EAB_HMAC_KEY": key}),
        "flag": (["--eab-hmac-key", key], None, None),
    }[source]
    result = run(data, "cert", "request", "--directory", "https://127.0.0.1:9/dir", "--eab-kid", EAB_KID, *args,
                 stdin=stdin, env=env)
    if source == "flag":
        warning, _, rest = result.stderr.partition("\n")
        assert warning.startswith(WARNING), result.stderr
        assert "--eab-hmac-key-file" in warning
        result.stderr = rest
    else:
        assert "warning" not in result.stderr
    one_line_error(result)
    assert key not in result.stdout + result.stderr
    with sqlite3.connect(DataLayout(data).db) as db:
        assert db.execute("SELECT value FROM settings WHERE key = 'acme_eab_hmac'").fetchone() == (key,)
        events = db.execute("SELECT * FROM events").fetchall()
    assert events, "the failed order is an event"
    assert key not in repr(events)


def test_eab_hmac_key_file_and_flag_exclusive(tmp_path: Path, data: Path) -> None:
    result = run(data, "cert", "request", "--eab-kid", EAB_KID, "--eab-hmac-key", "x", "--eab-hmac-key-file", "-")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_eab_hmac_key_file_empty_or_missing(tmp_path: Path, data: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    assert "the HMAC key file" in one_line_error(run(data, "cert", "request", "--eab-kid", EAB_KID,
                                                     "--eab-hmac-key-file", str(tmp_path / "empty")))
    assert "cannot read the HMAC key file" in one_line_error(run(
        data, "cert", "request", "--eab-kid", EAB_KID, "--eab-hmac-key-file", str(tmp_path / "absent")))


def test_cli_order_with_eab_key_from_a_file(box: BoxHandle, tmp_path: Path) -> None:
    # A CA that requires External Account Binding issues with the key read from the file.
    (tmp_path / "hmac").write_text(EAB_HMAC + "\n")
    with running_pebble(tmp_path / "pebble", box.port("http"), box.port("https"), eab=True) as pebble:
        point_at_pebble(box, pebble)
        result = run(box.data.root, "cert", "request", "--directory", pebble.directory,
                     "--ca-file", str(pebble.listener_ca), "--eab-kid", EAB_KID,
                     "--eab-hmac-key-file", str(tmp_path / "hmac"))
        assert result.returncode == 0, result.stderr
        assert f"issued for {HOST}" in result.stdout
        assert EAB_HMAC not in result.stdout + result.stderr
