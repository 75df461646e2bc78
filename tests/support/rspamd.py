"""A private rspamd + Redis on loopback for the content-filter tests and bench/spam.py.

Debian's rspamd reads /etc/rspamd/rspamd.conf; `LOCAL_CONFDIR`, `DBDIR`, `RUNDIR` and `LOGDIR` are
pointed at a temporary directory whose local.d/ holds the image's (image/overlay/etc/rspamd/local.d:
one controller that scans on the "scanner" port and learns on the "controller" port, the box-wide and
the per-mailbox Bayes classifiers) with the test's settings on top: its own loopback ports, its own
Redis, the classifiers' min_learns, every module that would reach the internet (DNS lists, URL lists, remote maps, fuzzy hashes) switched off,
and DNS sent to a loopback server that answers NXDOMAIN at once (a nameserver that does not answer
costs seconds per message). The box's own SPF/DKIM/DMARC checks are authoritative, so rspamd's are
off too, as on the image. A tiny public-suffix list keeps start-up to a few seconds (compiling the
full one takes a minute on a busy machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.dns_server import ZoneServer
from tests.support.polling import wait_until
from tests.support.ports import PORT_ATTEMPTS, PortTaken, free_ports, port_taken

IMAGE_RSPAMD = Path(__file__).resolve().parents[2] / "image" / "overlay" / "etc" / "rspamd"
IMAGE_LOCAL_D = IMAGE_RSPAMD / "local.d"
WARM_TLD = IMAGE_RSPAMD / "letterbox-warm-tld.lua"
HS_HELPER_EXIT = IMAGE_RSPAMD / "letterbox-hs-helper-exit.sh"
# The image's top-level settings (rspamd.conf includes $LOCAL_CONFDIR/rspamd.conf.local): the language
# detector reads only the languages linked in letterbox-languages/.
IMAGE_CONF_LOCAL = IMAGE_RSPAMD / "rspamd.conf.local"
IMAGE_LANGUAGES = IMAGE_RSPAMD / "letterbox-languages"
TLD_FILE = Path("/usr/share/rspamd/effective_tld_names.dat")
DROP_IN = IMAGE_RSPAMD.parent / "systemd" / "system" / "rspamd.service.d" / "letterbox.conf"  # Debian's rspamd: the full public-suffix list

# Modules that look things up on the internet, or act on their own (greylisting, rate limits).
OFF_MODULES = (
    "spf", "dkim", "dmarc", "arc", "dkim_signing", "rbl", "whitelist", "phishing", "multimap",
    "fuzzy_check", "greylist", "neural", "reputation", "ratelimit", "asn", "replies", "url_redirector",
    "history_redis", "hfilter", "mx_check", "rspamd_update", "emails", "dcc", "external_services",
)
TLDS = "com\norg\nnet\ntest\nexample\ninvalid\nlocalhost\n"


@dataclass
class RspamdPeer:
    root: Path
    min_learns: int | None = 20  # both classifiers' (None: the image's own)
    redis_timeout: float = 1.0  # how long rspamd waits for Redis before it scores without Bayes
    base_local: Path = IMAGE_LOCAL_D
    # None: a tiny public-suffix list (quick start); bench/spam.py: the image's (IMAGE_TLD) or Debian's
    # full one (TLD_FILE), compiled by rspamd as on a box.
    tld_file: Path | None = None
    # bench/spam.py: compile the list into rspamd's cache before it starts, as the image's
    # rspamd.service does (ExecStartPre: image/overlay/etc/rspamd/letterbox-warm-tld.lua).
    warm_tld: bool = False
    # bench/spam.py: end rspamd's hs_helper once it has compiled, as the image's rspamd.service does
    # (ExecStartPost: image/overlay/etc/rspamd/letterbox-hs-helper-exit.sh).
    end_hs_helper: bool = False
    # bench/spam.py --hyperscan: rspamd's regular expressions on Hyperscan, compiled by its hs_helper
    # (the image runs them on PCRE2: rspamd.conf.local, options.inc).
    hyperscan: bool = False
    # bench/spam.py: every module as the image has it (the loopback DNS answers NXDOMAIN, so the lists
    # and lookups of the internet fail at once); the tests switch off those that would ask the internet.
    image_modules: bool = False
    redis_maxmemory: str = "64mb"
    # Compiling the full public-suffix list takes minutes on a busy machine; the tests' tiny list starts
    # in seconds, but a fresh-clone CI beside a browser test has taken longer. Polled: a quiet start
    # returns at once.
    ready_seconds: float = 180.0
    scanner_port: int = 0
    controller_port: int = 0
    redis_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    helper: subprocess.Popen[bytes] | None = None  # letterbox-hs-helper-exit.sh, while it waits
    dns: ZoneServer | None = None
    # Where each log stood when its process was last started: a refused bind is looked for after it
    # (the logs are appended to across restarts and port attempts).
    log_marks: dict[str, int] = field(default_factory=dict)

    @property
    def scanner(self) -> str:
        return f"http://127.0.0.1:{self.scanner_port}"

    @property
    def controller(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def write_config(self) -> None:
        """The image's local.d (what a box runs: one controller that scans and learns, the box-wide and
        the per-mailbox Bayes) with this peer's loopback ports, Redis, DNS, logging and min_learns."""
        local, override = self.root / "local.d", self.root / "override.d"
        for path in (local, override, self.root / "db", self.root / "run", self.root / "log"):
            path.mkdir(parents=True, exist_ok=True)
        (self.root / "tld.dat").write_text(TLDS)
        ports = {"127.0.0.1:11333": f"127.0.0.1:{self.scanner_port}",
                 "127.0.0.1:11334": f"127.0.0.1:{self.controller_port}"}
        for path in self.base_local.iterdir():
            text = path.read_text()
            for image_port, port in ports.items():
                text = text.replace(image_port, port)
            if self.min_learns is not None:
                text = re.sub(r"^(\s*min_learns\s*=\s*)\d+", rf"\g<1>{self.min_learns}", text, flags=re.MULTILINE)
            (local / path.name).write_text(text)
        write_conf_local(self.root, hyperscan=self.hyperscan)
        assert self.dns is not None
        base_options = self.base_local / "options.inc"
        # The image's options.inc names its list by its path on a box: this peer's list instead.
        options = re.sub(r'^url_tld\s*=.*$', f'url_tld = "{self.tld}";', base_options.read_text(),
                         flags=re.MULTILINE) if base_options.exists() else f'url_tld = "{self.tld}";\n'
        if self.hyperscan:
            options = re.sub(r"^disable_hyperscan\s*=.*$", "", options, flags=re.MULTILINE)
        files = {
            local / "options.inc": (
                options +
                f'dns {{ nameserver = ["127.0.0.1:{self.dns.port}"]; timeout = 1s; retransmits = 1; }}\n'
                # The tests' mail comes from 127.0.0.1: judged as if from the internet.
                'local_addrs = [];\n'
            ),
            local / "logging.inc": f'type = "file";\nfilename = "{self.root / "log" / "rspamd.log"}";\nlevel = "info";\n',
            local / "redis.conf": f'servers = "127.0.0.1:{self.redis_port}";\ntimeout = {self.redis_timeout}s;\n',
        }
        for module in () if self.image_modules else OFF_MODULES:
            files[local / f"{module}.conf"] = "enabled = false;\n"
        for path, text in files.items():
            path.write_text(text)

    def start(self) -> None:
        """Redis, then rspamd, each answering. Ports this peer picks are picked together (one at a time,
        the same port came back twice: rspamd's scanner and Redis shared one, and rspamd never answered),
        and picked again when another process took one before it was bound."""
        picked = not self.scanner_port
        if self.dns is None:
            self.dns = ZoneServer()
            self.dns.start()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if picked:
                self.scanner_port, self.controller_port, self.redis_port = free_ports(3)
            self.write_config()
            try:
                self.start_redis()
                self.start_rspamd()  # not after Redis answers: both start at once, as before
                self.wait_redis()
                return
            except PortTaken:
                self.stop_helper()
                for name in list(self.procs):
                    self.end(name)
                if not picked or attempt == PORT_ATTEMPTS:
                    raise

    def start_rspamd(self) -> None:
        """rspamd alone, as rspamd.service starts it (ExecStartPre, ExecStart, ExecStartPost)."""
        if self.warm_tld:
            self.compile_tld()
        self.mark_log("rspamd.log")
        log = open(self.root / "log" / "rspamd.out", "ab")  # noqa: SIM115  the process's output; closed at once (it keeps its copy)
        with log:
            self.procs["rspamd"] = subprocess.Popen(
                [*no_thp_wrapper(), "rspamd", "-f", "-i", "-c", "/etc/rspamd/rspamd.conf",
                 f"--var=LOCAL_CONFDIR={self.root}", f"--var=DBDIR={self.root / 'db'}",
                 f"--var=RUNDIR={self.root / 'run'}", f"--var=LOGDIR={self.root / 'log'}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.end_hs_helper:
            self.watch_hs_helper()
        self.wait_ready()

    def restart_rspamd(self) -> None:
        """`systemctl reload rspamd` on a box: rspamd.service's ExecReload ends rspamd, and Restart=always
        starts it again (Redis goes on)."""
        self.stop_helper()
        self.end("rspamd")
        self.start_rspamd()

    def watch_hs_helper(self) -> None:
        """letterbox-hs-helper-exit.sh, as rspamd.service's ExecStartPost runs it."""
        self.stop_helper()
        # rspamd -f stays in the foreground: its pid is the main process's, as $MAINPID on a box.
        self.helper = subprocess.Popen(["sh", str(HS_HELPER_EXIT), str(self.procs["rspamd"].pid), "600"],
                                       stdin=subprocess.DEVNULL, start_new_session=True)

    def reload(self) -> None:
        """rspamd's own reload: SIGHUP to the main process, which reads its configuration again and
        replaces its workers (and starts a new hs_helper); returns once the old workers have gone and the
        new ones answer. A box's `systemctl reload rspamd` restarts rspamd instead (restart_rspamd)."""
        main = self.procs["rspamd"].pid
        old = set(self.pids()) - {main} - {p.pid for n, p in self.procs.items() if n != "rspamd"}
        os.kill(main, signal.SIGHUP)
        if self.end_hs_helper:
            self.watch_hs_helper()
        deadline = time.monotonic() + self.ready_seconds
        while old & set(self.pids()):
            if time.monotonic() > deadline:
                raise RuntimeError("rspamd's old workers did not end after a reload: " + self.log_tail())
            time.sleep(0.2)
        self.wait_ready()

    @property
    def tld(self) -> Path:
        return self.tld_file or self.root / "tld.dat"

    def compile_tld(self) -> None:
        subprocess.run(["rspamadm", "lua", "-b", "-s", str(WARM_TLD), "-a", str(self.tld), "-a", f"{self.root / 'db'}/"],
                       stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=self.ready_seconds)

    def start_redis(self) -> None:
        self.mark_log("redis.out")
        log = open(self.root / "log" / "redis.out", "ab")  # noqa: SIM115  closed at once (the process keeps its copy)
        with log:
            self.procs["redis"] = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.root / "db"), "--maxmemory", self.redis_maxmemory,
                 "--maxmemory-policy", "volatile-ttl"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def revive(self) -> None:
        """Start again, on their ports, whichever of Redis and rspamd has ended (a test killed it): a module's
        shared peer is whole for each test, whatever the one before did or where it failed."""
        if self.procs["redis"].poll() is not None:
            self.start_redis()
            self.wait_redis()
        if self.procs["rspamd"].poll() is not None:
            self.start_rspamd()

    def wait_redis(self) -> None:
        """Redis answering PING (it exits when its port is taken)."""
        def answering() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            if self.procs["redis"].poll() is not None:
                raise (PortTaken if port_taken(self.log_text("redis.out", since_start=True)) else RuntimeError)(
                    "Redis did not start: " + self.log_tail())
            return False

        wait_until(answering, seconds=self.ready_seconds, interval=0.05, what="Redis answering PING")

    def wait_ready(self) -> None:
        """rspamd's own readiness: its scanner answers /ping. Bounded by ready_seconds; a bind refused or
        an rspamd gone ends the wait at once, with the log lines that say why."""
        def ready() -> bool:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.scanner}/ping", timeout=5) as reply:  # noqa: S310  our loopback rspamd
                if reply.read().strip() == b"pong":
                    return True
            # rspamd goes on without the listener (its /ping never answers): told from its log at once.
            if port_taken(self.log_text("rspamd.log", since_start=True)):
                raise PortTaken("rspamd cannot listen: " + self.log_tail())
            if self.procs["rspamd"].poll() is not None:
                raise RuntimeError("rspamd ended as it started: " + self.log_tail())
            return False

        try:
            wait_until(ready, seconds=self.ready_seconds, interval=0.1, what="rspamd answering /ping")
        except AssertionError as exc:
            raise RuntimeError(f"rspamd did not start ({exc}): " + self.log_tail()) from None

    def mark_log(self, name: str) -> None:
        path = self.root / "log" / name
        self.log_marks[name] = path.stat().st_size if path.exists() else 0

    def log_text(self, name: str, *, since_start: bool = False) -> str:
        """A log's text; with since_start, only what its process wrote since it was last started."""
        path = self.root / "log" / name
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(self.log_marks.get(name, 0) if since_start else 0)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of each log, without the Hyperscan cache lines (rspamd logs dozens at each
        start, on PCRE2 by design) that hid a refused bind in a CI run's message."""
        texts = []
        for name in ("rspamd.out", "rspamd.log", "redis.out"):
            kept = [line for line in self.log_text(name).splitlines() if "hyperscan" not in line]
            texts.append("\n".join(kept[-lines:]))
        return "\n".join(text for text in texts if text)

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to one peer's whole process group (rspamd's main process and its workers)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def established(self, port: int = 0) -> int:
        """Open TCP connections to `port` (default the scanner's: a check under way; Redis's port:
        rspamd asking it)."""
        port = port or self.scanner_port
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    # remote address:port, state 01 = ESTABLISHED
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        count += 1
        return count

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def pids(self) -> list[int]:
        """Every process of both peers (for RSS): the group leaders and rspamd's workers."""
        found = []
        # A copy: bench/spam.py samples from another thread while start() adds processes.
        for proc in list(self.procs.values()):
            if proc.poll() is not None:
                continue
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        if os.getpgid(int(entry.name)) == proc.pid:
                            found.append(int(entry.name))
        return found

    def titles(self) -> list[str]:
        """The process titles of rspamd's processes ("rspamd: controller process ...")."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        return found

    def wait_hs_helper_gone(self, seconds: float) -> bool:
        """Whether rspamd's hs_helper ended within `seconds` and was not started again: the script that
        ends it (letterbox-hs-helper-exit.sh) exits once it has seen that."""
        if self.helper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.helper.wait(timeout=seconds)
        return not any(t.startswith("rspamd: hs_helper") for t in self.titles())

    def stop_helper(self) -> None:
        if self.helper is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.helper.pid, signal.SIGTERM)
            self.helper.wait(timeout=10)
            self.helper = None

    def end(self, name: str) -> None:
        """SIGTERM to one peer's process group; SIGKILL after 10 s."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop(self) -> None:
        self.stop_helper()
        for name in list(self.procs):
            self.end(name)
        if self.dns is not None:
            self.dns.stop()
            self.dns = None


def no_thp_wrapper() -> list[str]:
    """What the image's rspamd.service drop-in starts rspamd through (its ExecStart up to the rspamd
    command): python3 switching off transparent huge pages, then exec'ing what follows."""
    [line] = re.findall(r"^ExecStart=(/usr/bin/python3 .+)$", DROP_IN.read_text(), re.MULTILINE)
    words = shlex.split(line)
    return words[:words.index("/usr/bin/rspamd")]


def write_conf_local(confdir: Path, *, hyperscan: bool = False) -> None:
    """The image's rspamd.conf.local into `confdir` (rspamd's LOCAL_CONFDIR), its paths on a box turned
    into this checkout's (the language links point at Debian's files, the same on this machine).
    hyperscan: without its hs_helper section, so that hs_helper compiles into rspamd's DBDIR."""
    text = IMAGE_CONF_LOCAL.read_text().replace(f'"/etc/rspamd/{IMAGE_LANGUAGES.name}"', f'"{IMAGE_LANGUAGES}"')
    if hyperscan:
        text = re.sub(r'^worker "hs_helper" \{.*?^\}\n', "", text, flags=re.MULTILINE | re.DOTALL)
    (confdir / "rspamd.conf.local").write_text(text)


@contextlib.contextmanager
def running_rspamd(root: Path, *, min_learns: int = 20, redis_timeout: float = 1.0,
                   end_hs_helper: bool = False) -> Iterator[RspamdPeer]:
    peer = RspamdPeer(root, min_learns=min_learns, redis_timeout=redis_timeout, end_hs_helper=end_hs_helper)
    try:
        peer.start()
        yield peer
    finally:
        peer.stop()


# The public-suffix list the image gives rspamd (image/overlay/etc/rspamd/letterbox-tld.dat, made from
# Debian's by compact_suffixes below). Every top-level domain, so that rspamd still finds every URL
# written without a scheme ("shop.example.xyz"); of the multi-label suffixes only those under the
# generic second levels (co.uk, com.au, gov.br, ...), so that a registered domain there is still told
# apart from its neighbours (rspamd's URL rules and the "#u:" URL tokens of its Bayes use it).
IMAGE_TLD = IMAGE_RSPAMD / "letterbox-tld.dat"
GENERIC_SECOND_LEVELS = frozenset((
    "ac", "biz", "co", "com", "edu", "go", "gob", "gouv", "gov", "info", "int", "ltd", "mil", "ne", "net",
    "nom", "or", "org", "plc", "sch", "web",
))


def icann_suffixes(text: str) -> list[str]:
    """The rules of the ICANN section of a public-suffix list, in its order."""
    rules, icann = [], False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("// ===BEGIN ICANN"):
            icann = True
        elif line.startswith("// ===END ICANN"):
            break
        elif icann and line and not line.startswith("//"):
            rules.append(line)
    return rules


def compact_suffixes(text: str) -> list[str]:
    """The image's list from a full one: top-level domains, and generic second levels under them."""
    return [rule for rule in icann_suffixes(text)
            if "." not in rule or (rule.count(".") == 1 and rule.split(".")[0] in GENERIC_SECOND_LEVELS)]


def write_image_tld(source: Path = TLD_FILE, target: Path = IMAGE_TLD) -> None:
    """Regenerate the image's list: python -c 'from tests.support.rspamd import write_image_tld as w; w()'."""
    rules = compact_suffixes(source.read_text(encoding="utf-8"))
    header = (
        "// Letterbox (issue 16): rspamd's public-suffix list on a box (options.inc: url_tld), made from\n"
        f"// Debian's {source} by tests/support/rspamd.py (compact_suffixes).\n"
        "// Every ICANN top-level domain (rspamd finds URLs written without a scheme by their TLD) and the\n"
        "// generic second levels (co.uk, com.au, ...). Not the other multi-label suffixes (kawasaki.jp, the\n"
        "// private section: blogspot.com, github.io, ...): under those rspamd takes the suffix itself as the\n"
        "// registered domain. The full list costs about 60 MB more of rspamd's memory on amd64, where\n"
        "// rspamd compiles it into a 43 MB Hyperscan database mapped by every process (bench/spam.py).\n"
    )
    target.write_text(header + "\n".join(rules) + "\n", encoding="utf-8")
