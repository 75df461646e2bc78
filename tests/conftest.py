"""Shared fixtures: a real Letterbox on a background loop (`box`) and as a subprocess (`served_box`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import imaplib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from hypothesis import settings as hypothesis_settings

from appliance.config import STANDARD_PORTS, DataLayout, ServeConfig
from appliance.passwords import make_hasher
from appliance.queue import dns_cache
from bench import benchbox
from tests.support.polling import wait_until

# Property tests check answers, not speed (speed lives in bench/): hypothesis' default 200 ms deadline per
# example failed test_any_line_parses_or_raises_parse_error at load 11 with nothing wrong.
hypothesis_settings.register_profile("letterbox", deadline=None)
hypothesis_settings.load_profile("letterbox")

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
# Hypothesis keeps its example database and a cache of every tested module's constants under the working
# directory's .hypothesis/ (about 70 files after one `make test`): in the checkout, which a test run must leave
# as it found it. They go to the machine's tmp, one folder per checkout (a failing example found in one
# checkout is not replayed in another's code); HYPOTHESIS_STORAGE_DIRECTORY set outside still wins.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(Path(tempfile.gettempdir()) / f"letterbox-hypothesis-{hashlib.sha256(bytes(REPO)).hexdigest()[:12]}"),
)
LETTERBOX = str(Path(sys.executable).parent / "letterbox")
TEST_HOSTNAME = "localhost"  # mbsync/fetchmail match the cert name and ignore IP SANs (PEERS.md)
IN_CI = os.environ.get("CI", "").lower() == "true"


# Summed seconds of the files of 30 s and more (setup + call + teardown per file, from the JUnit XML of a
# fresh-clone `CI=true make test`, 2026-12-01 10:41-11:19, load 12-18, 2244 s, divided by 1.58 so that the
# files of the table before keep their sum, the units of the `slow(seconds=N)` markers): they need no `slow`
# marker to be handed out first. Refresh when a file's cost changes a lot. The table before this one had none
# of the console's unit files (tests/unit/test_web_*: about 500 s together in that run), which collection
# order put at the very end of the run.
MEASURED_FILE_SECONDS = {
    "tests/unit/test_web_security.py": 350, "tests/integration/test_cli.py": 180,
    "tests/integration/test_backup_cli.py": 175, "tests/integration/test_shared_use_cases.py": 165,
    "tests/unit/test_web_console.py": 135, "tests/integration/test_update.py": 170,
    "tests/e2e/test_queue_crash.py": 115, "tests/integration/test_acme_pebble.py": 110,
    "tests/e2e/test_kill_points.py": 100, "tests/integration/test_imap_message_cache.py": 95,
    "tests/integration/test_cert_cli.py": 90, "tests/unit/test_web_setup.py": 90,
    "tests/unit/test_imap_describe_paths.py": 85, "tests/integration/test_imap_mailbox.py": 85,
    "tests/unit/test_web_backups.py": 80, "tests/unit/test_mailstore.py": 75,
    "tests/integration/test_install_sh.py": 70, "tests/e2e/test_smtp_swaks.py": 70,
    "tests/unit/test_web_sending.py": 65, "tests/unit/test_import_cost.py": 65,
    "tests/integration/test_alerts_real.py": 60, "tests/integration/test_spam_envelope.py": 60,
    "tests/unit/test_web_certificate.py": 60, "tests/integration/test_inbound_auth.py": 60,
    "tests/unit/test_web_account.py": 55, "tests/integration/test_outbound_delivery.py": 55,
    "tests/e2e/test_imap_crash.py": 55, "tests/integration/test_smtp_limits.py": 55,
    "tests/integration/test_imap_search_index.py": 50, "tests/e2e/test_bench_side_by_side.py": 50,
    "tests/e2e/test_attack.py": 50, "tests/integration/test_imap_login.py": 45,
    "tests/integration/test_web_server.py": 45, "tests/integration/test_data_lock.py": 45,
    "tests/integration/test_status_checks.py": 45, "tests/integration/test_smtp_delivery.py": 45,
    "tests/unit/test_address_list.py": 45, "tests/e2e/test_removal_crash.py": 45,
    "tests/unit/test_address.py": 40, "tests/e2e/test_console_mailbox_recreate.py": 40,
    "tests/e2e/test_web_wizard.py": 40, "tests/e2e/test_backup_web.py": 40, "tests/e2e/test_smtp_crash.py": 40,
    "tests/e2e/test_web_certificate.py": 35, "tests/integration/test_smtp_listeners.py": 35,
    "tests/unit/test_imap_parser.py": 35, "tests/integration/test_live_settings.py": 35,
    "tests/unit/test_index.py": 35, "tests/e2e/test_console_phone.py": 35,
    "tests/integration/test_imap_abuse.py": 35, "tests/integration/test_startup.py": 35,
    "tests/e2e/test_imap_clients.py": 30, "tests/integration/test_imap_store_pipelined.py": 30,
    "tests/e2e/test_web_spam.py": 30, "tests/integration/test_imap_notify.py": 30,
    "tests/integration/test_spam_bayes.py": 30, "tests/integration/test_spam_content.py": 30,
    "tests/e2e/test_console_running.py": 30, "tests/unit/test_imap_fetch_cache.py": 30,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked slow run first. `make test` hands whole files to its workers in collection order
    (`--dist loadfile`): a minutes-long file that starts last is the whole suite's tail, one that starts
    first runs beside the many short ones; the longest (`slow(seconds=N)`, a rough quiet-machine figure,
    or MEASURED_FILE_SECONDS) go first of all. The sort is stable, so the order inside a file is kept."""
    def expected_seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        marked = 0.0 if marker is None else float(marker.kwargs.get("seconds", 30))
        return max(marked, MEASURED_FILE_SECONDS.get(item.nodeid.split("::", 1)[0], 0.0))

    items.sort(key=expected_seconds, reverse=True)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist 3 reorders `--dist loadfile` work by the number of tests in each file, most first, which
    undoes the order above: the 240 s update test (two tests) started last and was the whole suite's tail.
    Keep the collection order (what `--no-loadscope-reorder` says on the command line)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.fixture(autouse=True)
def _fresh_dns_cache() -> Iterator[None]:
    """The box's DNS cache is per process and keyed by server address: a loopback DNS server's port may
    be reused by the next test's server, whose records differ."""
    dns_cache.forget_all()
    yield
    dns_cache.forget_all()


def require_program(name: str) -> str:
    """Path of a Debian test peer; under CI=true a missing one fails the test instead of skipping it."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        message = f"{name} is not installed (make test installs it: see Makefile 'peers')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def install_test_certificate(ca: trustme.CA, layout: DataLayout) -> None:
    # fetchmail 6.4 refuses a server certificate without a subject CN, whatever its SANs say.
    cert = ca.issue_cert(TEST_HOSTNAME, "127.0.0.1", "mail.example.test", common_name=TEST_HOSTNAME)
    layout.tls.mkdir(parents=True, exist_ok=True)
    (layout.tls / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = layout.tls / "key.pem"
    key.write_bytes(cert.private_key_pem.bytes())
    key.chmod(0o600)


# Settings every test box starts with: outbound mail stays queued (the queue would otherwise ask the
# system's DNS and connect to real MX hosts) and the MX adds no SPF/DKIM/DMARC results (which also
# need DNS), and no content filter (rspamd: issue 16). Tests of those parts turn them on with their own
# loopback DNS server (issue 7) or rspamd (tests/support/rspamd.py).
# status_checks off: its background run would probe the internet (a remote MX, public DNS)
# and port25_probe on loopback's discard port, in case a test runs the checklist without its own target.
TEST_SETTINGS = {"queue_hold": "1", "inbound_auth": "off", "status_checks": "off", "spam_content_filter": "off",
                 "port25_probe": "127.0.0.1:9"}


def preset_settings(layout: DataLayout, settings: dict[str, str] = TEST_SETTINGS) -> None:
    """Write settings into the box's db before it starts (creating and migrating the db)."""
    from appliance.db import Database

    async def write() -> None:
        db = await Database.open(layout.db)
        try:
            for key, value in settings.items():
                await db.set_setting(key, value)
        finally:
            await db.close()

    asyncio.run(write())


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# argon2id at the box's cost (19 MiB, t=2) is ~200 ms of a core per password set and per first login; the
# in-process boxes hash at the cheapest cost instead. `letterbox serve` subprocesses keep the real one.
TEST_HASHER = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)


class BoxHandle:
    """The whole box on its own event loop thread; blocking clients run in the test thread."""

    def __init__(self, root: Path, ca: trustme.CA, disabled: frozenset[str] = frozenset()) -> None:
        from appliance.app import Box

        self.data = DataLayout(root)
        self.data.create()
        install_test_certificate(ca, self.data)
        preset_settings(self.data)
        self.client_context = client_context(ca)
        self.ca = ca
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="letterbox-loop", daemon=True)
        self._thread.start()
        config = ServeConfig(
            data=self.data,
            listen="127.0.0.1",
            port_overrides=dict.fromkeys(STANDARD_PORTS, 0),
            disabled=disabled,
            hostname="mail.example.test",
        )
        try:
            self.box = self.run(self._start_with_test_hasher(Box.start(config)))
        except BaseException:
            self._stop_loop()
            raise
        self.services = self.box.services

    @staticmethod
    async def _start_with_test_hasher(start: Coroutine[Any, Any, T]) -> T:
        """The box's Accounts (and so its Auth) take passwords.DEFAULT_HASHER when built: during the start it
        is TEST_HASHER. Hashing and verifying run the same code; tests about the cost build their own."""
        from appliance import passwords

        real = passwords.DEFAULT_HASHER
        passwords.DEFAULT_HASHER = TEST_HASHER
        try:
            return await start
        finally:
            passwords.DEFAULT_HASHER = real

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, service: str) -> int:
        return self.box.port(service)

    def add_user(self, address: str, password: str, quota_bytes: int = 0) -> None:
        async def add() -> None:
            domain = address.rsplit("@", 1)[1]
            accounts = self.services.accounts
            if not await accounts.is_local_domain(domain):
                await accounts.add_domain(domain)
            await accounts.add_user(address, password, quota_bytes=quota_bytes)

        self.run(add())

    def close(self) -> None:
        try:
            self.run(self.box.stop(), timeout=15)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def box(tmp_path: Path, ca: trustme.CA) -> Iterator[BoxHandle]:
    handle = BoxHandle(tmp_path / "data", ca)
    try:
        yield handle
    finally:
        handle.close()


# --- the real process ------------------------------------------------------------------------------

PORT_BLOCK = benchbox.PORT_BLOCK
# Offsets 11000..30000: above `make run`'s 10000 and below the kernel's ephemeral range (32768 and up), so a
# box restarted on its ports never finds one taken by some client's outgoing connection meanwhile.
PORT_BLOCKS = range(11, 31)  # 31000 and up: bench/benchbox.py (the attack test)


def pick_port_offset() -> int:
    # A block this process holds (or can claim) whose ports are all free: a box still running holds its own,
    # and a box killed and restarted finds its block again. The claims are bench/benchbox.py's, which the
    # benches run by tests take too.
    for block in sorted(PORT_BLOCKS, key=lambda b: not benchbox.holds_offset(b * PORT_BLOCK)):
        offset = block * PORT_BLOCK
        if benchbox.claim_offset(offset) and benchbox.ports_free(offset):
            return offset
    raise RuntimeError("no free port range for letterbox serve")


class ServedBox:
    """`letterbox serve` as a subprocess on its own data dir and port offset."""

    def __init__(self, root: Path, ca: trustme.CA) -> None:
        self.data = DataLayout(root / "data")
        self.data.create()
        install_test_certificate(ca, self.data)
        preset_settings(self.data)
        self.ca = ca
        self.ca_file = root / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.client_context = client_context(ca)
        self.log_path = root / "serve.log"
        self.offset = 0
        self.hostname = TEST_HOSTNAME  # a test may name the box otherwise before start()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "LETTERBOX_DATA": str(self.data.root), "PYTHONUNBUFFERED": "1"}

    def start(self, timeout: float = 60) -> None:
        # 60 s: a new box was ready in 8.5 s at load 9 (its first start makes its keys), and a full run at
        # load ~20 has seen a start pass 30 s; how fast a box starts is bench/startup.py's, not the tests'.
        self.offset = pick_port_offset()
        log = self.log_path.open("ab")
        earlier = log.tell()  # a restart appends: only this run's "ready" counts
        self.proc = subprocess.Popen(
            [LETTERBOX, "serve", "--listen", "127.0.0.1", "--port-offset", str(self.offset),
             "--hostname", self.hostname],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.data.root.parent,
        )
        log.close()
        proc = self.proc

        def ready() -> bool:
            if b"\nready\n" in self.log_path.read_bytes()[earlier:]:
                return True
            if proc.poll() is not None:
                raise RuntimeError(f"letterbox serve exited: {self.log_path.read_text(errors='replace')}")
            return False

        try:
            wait_until(ready, seconds=timeout, interval=0.05, what="letterbox serve ready")
        except AssertionError:
            self.kill()
            raise RuntimeError(f"letterbox serve not ready: {self.log_path.read_text(errors='replace')}") from None
        except BaseException:
            # pytest-timeout's failure (or ^C) inside the wait: no fixture teardown will stop this process,
            # and in a loaded full run such orphans kept serving (and taking CPU) until the run ended.
            self.kill()
            raise

    def port(self, service: str) -> int:
        return STANDARD_PORTS[service] + self.offset

    def imap(self, user: str, password: str, timeout: float = 20) -> imaplib.IMAP4_SSL:
        """A session over IMAPS, logged in as `user`; its socket closed when the login fails (a box being
        killed, a slow one past the timeout), not left to the collector's ResourceWarning in a later test."""
        client = imaplib.IMAP4_SSL("localhost", self.port("imaps"), ssl_context=self.client_context, timeout=timeout)
        try:
            client.login(user, password)
        except BaseException:
            with contextlib.suppress(OSError):
                client.shutdown()
            raise
        return client

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [LETTERBOX, *args], input=input, capture_output=True, text=True, env=self.env(), timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"letterbox {' '.join(args)} failed: {result.stderr}")
        return result

    def add_user(self, address: str, password: str) -> None:
        """The mailbox (and its domain) made by the application functions `letterbox domain add` and
        `letterbox user add` call, in this process: three CLI interpreters cost 4-5 s of CPU per user (the
        CLI itself is tested in tests/integration/test_cli.py). The running box reads the database."""
        from appliance.admin import open_admin

        async def add() -> None:
            async with open_admin(self.data.root) as admin:
                domain = address.rsplit("@", 1)[1]
                if not await admin.accounts.is_local_domain(domain):
                    await admin.add_domain(domain)
                await admin.create_mailbox(address, password)

        asyncio.run(add())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def served_box(tmp_path: Path, ca: trustme.CA) -> Iterator[ServedBox]:
    served = ServedBox(tmp_path, ca)
    served.start()
    try:
        yield served
    finally:
        served.stop()
