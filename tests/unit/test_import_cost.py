"""Start-up cost (issue 15): what importing the CLI, the admin layer and the composition root loads.

Each check runs a fresh interpreter and counts or lists its modules; no clock is read, so load on the
machine cannot make it flaky. The bounds leave some room above what was measured (the figures in the
comments); a change that pushes a heavy library back into an eager import fails here with its name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Never loaded by `import appliance.cli` (argparse set-up, --help, --version): each command imports its
# own dependencies when it runs.
CLI_NEVER = ("asyncio", "aiosqlite", "sqlite3", "argon2", "cryptography", "dns", "appliance.admin",
             "appliance.db", "appliance.update", "appliance.backup", "appliance.accounts")

# Never loaded by the admin layer that every CLI command opens: only the use-cases that need them do.
ADMIN_NEVER = ("appliance.certificates", "appliance.acme_client", "appliance.tls", "appliance.backup",
               "appliance.backup_restic", "appliance.bundle", "appliance.update", "appliance.dns_check",
               "appliance.dns_records", "dns", "cryptography", "pyrage", "zstandard", "smtplib", "appliance.app")

# Never loaded by the composition root (appliance.app), which every `serve` imports before the web
# console: the ACME client is imported when a certificate is ordered, the console itself by the HTTPS
# listener when it is made.
APP_NEVER = ("appliance.acme_client", "web", "jinja2", "appliance.update", "appliance.bundle", "tarfile")

# Never loaded before the web console answers (the composition root and the console's app): `serve` imports
# the mail listeners and the services behind them only once the console serves (issue 15, console first).
CONSOLE_NEVER = ("aiosmtpd", "appliance.smtp.server", "appliance.imap.server", "appliance.pop3.server",
                 "appliance.queue.service", "appliance.inbound_auth", "appliance.imap.fts", "dkim", "spf",
                 "authres", "publicsuffixlist")

# Never loaded by the web console's app: the pages other than the login, the wizard and the ACME answers
# are imported on their first request (web/lazy_routes.py), and with them backups, updates, charts; jinja2
# when the first page is rendered (web.app.Templates).
WEB_NEVER = ("web.routes.backups", "web.routes.restore", "web.routes.updates", "web.routes.certificate",
             "web.routes.spam", "web.routes.delivery_log", "web.routes.console", "web.routes.domains",
             "web.routes.mailboxes", "web.routes.sending", "web.routes.account", "web.routes.autoconfig",
             "web.charts", "appliance.update", "appliance.bundle", "appliance.backup_restic", "xml", "plistlib",
             "jinja2", "starlette.templating")

# Never loaded by a box that has started and serves (every listener, the background services, the web
# console's app), until something asks for them.
SERVE_NEVER = ("appliance.acme_client", "appliance.bundle", "tarfile", "appliance.backup_restic", "web.charts",
               "web.routes.backups", "web.routes.restore", "web.routes.updates", "web.routes.console", "xml", "plistlib",
               "jinja2")

# Never loaded by a box's server process, its first start included (the self-signed certificate is made
# in a child process), until something asks for them: cryptography's Rust library is 9-10 MB of RSS that
# CPython never unloads (issue 19). It comes with an ACME order, a backup.
RESTART_NEVER = ("cryptography",)

# A real box in a fresh interpreter: the data directory is made (in DATA, or a temporary directory),
# every listener bound on 127.0.0.1 port 0.
START_A_BOX = """
import asyncio, os, pathlib, sys, tempfile
from appliance.app import Box
from appliance.config import STANDARD_PORTS, DataLayout, ServeConfig

async def start_and_stop(data: pathlib.Path) -> None:
    config = ServeConfig(data=DataLayout(data), listen="127.0.0.1",
                         port_overrides=dict.fromkeys(STANDARD_PORTS, 0), hostname="mail.example.test")
    box = await Box.start(config)
    await box.stop()

if "DATA" in os.environ:
    asyncio.run(start_and_stop(pathlib.Path(os.environ["DATA"])))
else:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(start_and_stop(pathlib.Path(tmp) / "data"))
"""


def loaded(statement: str, env: dict[str, str] | None = None) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, **(env or {})})
    names: list[str] = json.loads(out.stdout.splitlines()[-1])
    return names


def offenders(names: list[str], never: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == bad or n.startswith(bad + ".") for bad in never))


def test_the_cli_parser_and_help_load_a_small_fraction() -> None:
    names = loaded("import appliance.cli")
    assert offenders(names, CLI_NEVER) == []
    assert len(names) < 140  # 104 measured (438 before issue 15's work)
    helped = loaded("import contextlib, io\nfrom appliance import cli\n"
                    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                    "    cli.main(['--help'])\n"
                    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                    "    cli.main(['--version'])")
    assert offenders(helped, CLI_NEVER) == []


def test_the_admin_layer_loads_only_what_every_use_case_needs() -> None:
    names = loaded("import appliance.admin")
    assert offenders(names, ADMIN_NEVER) == []
    assert len(names) < 280  # 237 measured (437 before)


def test_starting_the_box_leaves_the_heavy_parts_for_later() -> None:
    assert offenders(loaded("import appliance.app"), APP_NEVER) == []
    assert offenders(loaded("import web.app"), WEB_NEVER) == []
    console = loaded("import appliance.app, web.app")
    assert offenders(console, CONSOLE_NEVER) == []
    assert len(console) < 680  # 620 measured (690 before the console came first)


def test_a_started_box_has_not_loaded_what_nobody_asked_for() -> None:
    names = loaded(START_A_BOX)
    assert offenders(names, SERVE_NEVER) == []
    assert len(names) < 780  # 714 measured (744 before issue 15's work)


def test_a_box_leaves_cryptography_for_later_from_its_first_start(tmp_path: Path) -> None:
    env = {"DATA": str(tmp_path / "data")}
    assert offenders(loaded(START_A_BOX, env), RESTART_NEVER) == []  # it made the certificate
    assert (tmp_path / "data" / "tls" / "cert.pem").exists()
    assert (tmp_path / "data" / "tls" / "cert-info.json").exists()
    assert offenders(loaded(START_A_BOX, env), RESTART_NEVER) == []


def test_the_dkim_record_is_written_without_cryptography(tmp_path: Path) -> None:
    """The status checks show every domain's DKIM record every few hours."""
    from appliance.dkim_keys import generate_key

    key = generate_key(tmp_path, "example.org", "s1")
    names = loaded("import os\nfrom appliance.dkim_keys import DkimKey\n"
                   "assert DkimKey('example.org', 's1', os.environb[b'PEM']).txt_record().startswith('v=DKIM1')",
                   {"PEM": key.private_pem.decode()})
    assert offenders(names, RESTART_NEVER) == []


def test_keys_and_certificates_are_made_and_checked_in_a_child(tmp_path: Path) -> None:
    """A domain's DKIM key (the wizard, `domain add`), the wizard's self-signed certificate for the name
    chosen, an uploaded certificate's checks: each in a child process, so the server never keeps
    cryptography (appliance/child.py)."""
    names = loaded(
        "import os, pathlib\n"
        "from appliance.dkim_keys import generate_key_in_child, load_key\n"
        "from appliance.tls import TlsManager, new_self_signed, CertificateProblem\n"
        "root = pathlib.Path(os.environ['ROOT'])\n"
        "key = generate_key_in_child(root / 'dkim', 'Example.org', 's1')\n"
        "assert key.txt_record().startswith('v=DKIM1') and load_key(root / 'dkim', 'example.org', 's1') == key\n"
        "tls = TlsManager(root / 'tls', 'mail.example.org')\n"
        "assert tls.info().names[0] == 'mail.example.org' and tls.info().self_signed\n"
        "cert, private, _ = new_self_signed('other.example.org')\n"
        "assert tls.install(cert, private, hostname='other.example.org').names[0] == 'other.example.org'\n"
        "assert tls.info().names[0] == 'other.example.org'\n"
        "try:\n"
        "    tls.install(cert, private, hostname='third.example.org')\n"
        "except CertificateProblem as exc:\n"
        "    assert 'does not cover the host name third.example.org' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('installed a certificate for another name')\n"
        # The console's and CLI's 'new self-signed certificate': made and checked in one child.
        "import appliance.child as child\n"
        "calls = []\n"
        "real = child.call\n"
        "child.call = lambda *a, **k: calls.append(a[0]) or real(*a, **k)\n"
        "info = tls.install_self_signed('fourth.example.org')\n"
        "assert calls == ['appliance.tls:_checked_self_signed_record'], calls\n"
        "assert info.self_signed and info.names[0] == 'fourth.example.org' and tls.info() == info\n"
        "assert b'BEGIN CERTIFICATE' in (root / 'tls' / 'cert.pem').read_bytes()",
        {"ROOT": str(tmp_path)})
    assert offenders(names, RESTART_NEVER) == []


def test_a_dkim_signature_leaves_cryptography_unloaded(tmp_path: Path) -> None:
    """The server signs every message of its users' domains: the RSA step is the libcrypto that ssl
    loaded (appliance/libcrypto.py), so the first signature does not bring cryptography's 9-10 MB."""
    from appliance.dkim_keys import generate_key

    key = generate_key(tmp_path, "example.org", "s1")
    names = loaded("import os, ssl\nimport dkim\nfrom appliance.dkim_keys import DkimKey\n"
                   "from appliance.queue.dkim_sign import sign\n"
                   "signed = sign(b'From: <a@example.org>\\r\\nSubject: x\\r\\n\\r\\nbody\\r\\n', "
                   "DkimKey('example.org', 's1', os.environb[b'PEM']))\n"
                   "assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: os.environb[b'TXT'])",
                   {"PEM": key.private_pem.decode(), "TXT": key.txt_record()})
    assert offenders(names, RESTART_NEVER) == []


def test_a_backup_leaves_cryptography_unloaded(tmp_path: Path) -> None:
    """A scheduled backup runs every night: its age header (X25519 or scrypt) is made by the child
    process that compresses and encrypts (appliance/backup_stream.py), not by the server."""
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    archive = tmp_path / "backup.age"
    names = loaded("import os\nfrom appliance import backup_stream\n"
                   "fd = os.open(os.environ['ARCHIVE'], os.O_WRONLY | os.O_CREAT, 0o600)\n"
                   "sink = backup_stream.Sink(fd, recipient=os.environ['RECIPIENT'])\n"
                   "sink.write(b'letterbox' * 1000)\nsink.close()\nos.close(fd)",
                   {"ARCHIVE": str(archive), "RECIPIENT": str(identity.to_public())})
    assert offenders(names, RESTART_NEVER) == []
    import zstandard

    plain = zstandard.ZstdDecompressor().decompressobj().decompress(pyrage.decrypt(archive.read_bytes(), [identity]))
    assert plain == b"letterbox" * 1000
