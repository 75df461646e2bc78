"""`letterbox serve` as a real process: starts on its ports, makes its certificate, stops on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from appliance.config import DataLayout
from tests.conftest import LETTERBOX, ServedBox, pick_port_offset
from tests.support.umask import umask


def test_serve_listens_and_stops_on_sigterm_within_5s(served_box: ServedBox) -> None:
    log = served_box.log_path.read_text()
    assert "ready" in log
    for service in ("smtp", "imap", "pop3"):
        if f" {service} " in log:
            with socket.create_connection(("127.0.0.1", served_box.port(service)), timeout=5):
                pass
    assert served_box.data.db.exists()
    started = time.monotonic()
    code = served_box.stop(signal.SIGTERM)
    assert time.monotonic() - started < 5
    assert code == 0


def test_serve_makes_its_files_private_whatever_the_shells_umask(tmp_path: Path, ca: trustme.CA) -> None:
    """`make run` starts the box with the shell's umask (often 022), the appliance's unit with 0077:
    the box takes 0077 itself, so what it makes without a mode of its own (an upload, a snapshot, a
    temporary file) is as private under either."""
    box = ServedBox(tmp_path, ca)
    with umask(0o022):
        box.start()
    try:
        assert box.proc is not None
        status = Path(f"/proc/{box.proc.pid}/status").read_text()
        assert "\nUmask:\t0077\n" in status
    finally:
        box.stop()


def test_first_start_makes_a_self_signed_certificate(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    offset = pick_port_offset()
    proc = subprocess.Popen(
        [LETTERBOX, "--data", str(layout.root), "serve", "--listen", "127.0.0.1", "--port-offset", str(offset),
         "--hostname", "mail.example.test"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                break
        assert any("data in" in line for line in lines), lines
        cert = x509.load_pem_x509_certificate((layout.tls / "cert.pem").read_bytes())
        assert cert.subject == cert.issuer
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "mail.example.test" in names.get_values_for_type(x509.DNSName)
        assert (layout.tls / "key.pem").stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_tls_context_reloads_a_new_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    from appliance.tls import CertificateProblem, TlsManager

    manager = TlsManager(tmp_path / "tls", "mail.example.test")
    assert manager.info().self_signed
    issued = ca.issue_cert("mail.example.test")
    context = manager.context
    manager.install(b"".join(b.bytes() for b in issued.cert_chain_pems), issued.private_key_pem.bytes())
    assert manager.context is context  # the same object, so every listener sees the new certificate
    assert not manager.info().self_signed
    bad = ca.issue_cert("other.example.test")
    # A key that does not match the certificate is refused in plain words, and the live one stays.
    with pytest.raises(CertificateProblem, match="does not belong"):
        manager.install(bad.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes())
    assert "mail.example.test" in manager.info().names


def test_a_start_reads_the_certificates_details_saved_for_that_very_file(tmp_path: Path, ca: trustme.CA) -> None:
    """The details a start serves come from tls/cert-info.json only while it describes the bytes of
    cert.pem: a certificate installed, or replaced by hand, is read again and saved anew."""
    from appliance.tls import CERT_FILE, INFO_FILE, KEY_FILE, TlsManager

    tls = tmp_path / "tls"
    first = TlsManager(tls, "mail.example.test").info()
    assert (tls / INFO_FILE).is_file()
    assert TlsManager(tls, "mail.example.test").info() == first
    issued = ca.issue_cert("mail.example.test")
    TlsManager(tls, "mail.example.test").install(
        b"".join(b.bytes() for b in issued.cert_chain_pems), issued.private_key_pem.bytes())
    installed = TlsManager(tls, "mail.example.test").info()
    assert not installed.self_signed
    assert installed.serial != first.serial
    # cert.pem and key.pem replaced behind the box's back, and cert-info.json damaged: read again.
    other = ca.issue_cert("other.example.test")
    (tls / CERT_FILE).write_bytes(other.cert_chain_pems[0].bytes())
    (tls / KEY_FILE).write_bytes(other.private_key_pem.bytes())
    assert TlsManager(tls, "mail.example.test").info().names == ("other.example.test",)
    (tls / INFO_FILE).write_text("{not json")
    assert TlsManager(tls, "mail.example.test").info().names == ("other.example.test",)
    assert TlsManager(tls, "mail.example.test").info() == TlsManager(tls, "mail.example.test").info()


def test_a_start_removes_the_uploads_an_earlier_run_left_unconfirmed(tmp_path: Path, ca: trustme.CA) -> None:
    """A backup uploaded in the console waits beside the data directory for its confirmation, which
    lives in the serving process: after a restart (an update, a reboot) nothing could confirm or expire
    it, and a backup-sized file stayed on the disk for good. Another box's files are left alone."""
    box = ServedBox(tmp_path / "box", ca)
    parent = box.data.root.parent
    left = parent / f".{box.data.root.name}.upload-0123abcd"
    left.write_bytes(b"age-encryption.org/v1\n" + b"x" * 1000)
    other = parent / ".other.upload-0123abcd"
    other.write_bytes(b"not this box's")
    box.start()
    try:
        assert not left.exists()
        assert other.exists()
    finally:
        box.stop()
