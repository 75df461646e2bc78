"""A box under steady mixed use for a while, sampled every minute, then killed with SIGKILL under load and
started again on the same data to check what it acknowledged (`python -m bench.soak --minutes 20 DIR`).

Load (threads, a few operations a second in all): SMTP in (to mailboxes, aliases, unknown users, oversized),
submission with AUTH (to outside domains: the queue defers them, its resolver is a dead loopback port), IMAP
sessions (plain, STARTTLS, 993: SELECT, FETCH, STORE, MOVE to Junk and back, EXPUNGE, APPEND, IDLE, some
dropped mid-command), POP3 with and without DELE, console logins and pages, a failed-login storm from
127.0.0.2 in minutes 2-3, a CLI backup at half time. Mailboxes of domain c.test are never deleted from:
every message acknowledged to them must be there exactly once after the kill.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import http.client
import imaplib
import json
import os
import poplib
import random
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench.benchbox import LETTERBOX, cli, code_env, free_offset, set_settings

DOMAINS = ("a.test", "b.test", "c.test")
USERS = [f"u{i}@{DOMAINS[i % 3]}" for i in range(20)]
PROTECTED = [u for u in USERS if u.endswith("@c.test")]  # nothing deletes from these
ALIASES = {"all@a.test": ["u0@a.test", "u3@a.test"], "team@c.test": ["u2@c.test", "u5@c.test"],
           "fwd@b.test": ["u1@b.test"]}
ADMIN_PASSWORD = "soak-admin-password-1"


def password(user: str) -> str:
    return "pw-" + user.replace("@", "-at-") + "-soak"


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Soak:
    def __init__(self, root: Path, offset: int, minutes: float) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "serve.log"
        self.offset = offset
        self.minutes = minutes
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, list[str]] = {}  # mailbox -> Message-IDs acknowledged (250 / APPEND OK)
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.uids: dict[tuple[str, str], tuple[int, int]] = {}  # (user, folder) -> (UIDVALIDITY, max UID seen)
        self.notes: list[str] = []
        self.seq = 0
        self.backed_up = False
        self.storm_answers: dict[str, int] = {}
        self.last_release_check = 0.0
        self.start = time.monotonic()

    # --- bookkeeping
    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def error(self, what: str, exc: BaseException) -> None:
        key = f"{what}: {type(exc).__name__} {str(exc)[:80]}"
        with self.lock:
            self.errors[key] = self.errors.get(key, 0) + 1

    def ack(self, user: str, mid: str) -> None:
        with self.lock:
            self.acked.setdefault(user, []).append(mid)

    def message(self, to: str, size: int = 0) -> tuple[str, bytes]:
        with self.lock:
            self.seq += 1
            n = self.seq
        mid = f"<soak-{n}-{os.getpid()}@soak.test>"
        body = f"line of soak text {n}\r\n" * max(1, size // 24 or random.randint(2, 200))
        raw = (f"From: sender@outside.test\r\nTo: {to}\r\nSubject: soak {n}\r\nMessage-ID: {mid}\r\n"
               f"Date: {email.utils.formatdate()}\r\n\r\n{body}").encode()
        return mid, raw

    def port(self, name: str) -> int:
        return {"smtp": 25, "submission": 587, "imap": 143, "imaps": 993, "pop3": 110, "https": 443}[name] + self.offset

    def elapsed_min(self) -> float:
        return (time.monotonic() - self.start) / 60

    # --- the box
    def prepare(self) -> None:
        self.data.mkdir(parents=True)
        for d in DOMAINS:
            cli(self.data, "domain", "add", d)
        for u in USERS:
            cli(self.data, "user", "add", "--password-stdin", u, stdin=password(u) + "\n")
        for alias, targets in ALIASES.items():
            cli(self.data, "alias", "add", alias, *targets)
        cli(self.data, "admin", "add", "--password-stdin", "admin", stdin=ADMIN_PASSWORD + "\n")
        cli(self.data, "backup", "key", "--kit-to", str(self.root / "kit.txt"))
        set_settings(self.data, {"queue_hold": "0", "dns_resolver": "127.0.0.1:9", "inbound_auth": "off",
                                 "status_checks": "off", "spam_content_filter": "off",
                                 "port25_probe": "127.0.0.1:9"})

    def serve(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [LETTERBOX, "--data", str(self.data), "serve", "--listen", "127.0.0.1", "--port-offset",
                 str(self.offset), "--hostname", "localhost"], stdout=out, stderr=subprocess.STDOUT,
                env=code_env(None))
        deadline = time.monotonic() + 90
        size = self.log.stat().st_size
        while True:
            with self.log.open("rb") as f:
                f.seek(max(0, size - 10))
                if b"\nready\n" in f.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start: " + self.log.read_text()[-3000:])
            time.sleep(0.1)

    # --- load
    def loop(self, what: str, period: float, fn: Any) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                fn()
                self.count(what)
            except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
                self.error(what, exc)
            self.stop.wait(max(0.0, period * random.uniform(0.5, 1.5) - (time.monotonic() - t0)))

    def smtp_in(self) -> None:
        if random.random() < 0.1:
            # Unknown users, from an address of a network of their own: the harvesting defence blocks a
            # network that asks for too many, and the known users' mail comes from 127.0.0.1.
            source = (f"127.0.{random.randint(10, 250)}.{random.randint(1, 250)}", 0)
            with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=30, source_address=source) as s:
                to = f"nobody{random.randint(1, 99)}@{random.choice(DOMAINS)}"
                with contextlib.suppress(smtplib.SMTPRecipientsRefused):
                    s.sendmail("sender@outside.test", [to], self.message(to)[1])
                    raise RuntimeError(f"unknown {to} accepted")
            return
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=30) as s:
            for _ in range(random.randint(1, 3)):
                r = random.random()
                if r < 0.03:
                    code, _ = s.mail("big@outside.test", ["SIZE=40000000"])
                    if code // 100 != 5:
                        raise RuntimeError(f"oversized MAIL answered {code}")
                    s.rset()
                    continue
                if r < 0.2:
                    to = random.choice(list(ALIASES))
                    users = ALIASES[to]
                else:
                    to = random.choice(USERS)
                    users = [to]
                mid, raw = self.message(to)
                s.sendmail("sender@outside.test", [to], raw)
                for u in users:
                    self.ack(u, mid)

    def smtp_big(self) -> None:
        """A message over the size limit sent whole: refused after the dot."""
        if self.elapsed_min() < 1:
            return
        with smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=120) as s:
            _, raw = self.message("u0@a.test", size=37 * 1024 * 1024)
            try:
                s.sendmail("big@outside.test", ["u0@a.test"], raw)
                raise RuntimeError("oversized message accepted")
            except smtplib.SMTPDataError as exc:
                if exc.smtp_code // 100 != 5:
                    raise
            except smtplib.SMTPSenderRefused:
                pass

    def submission(self) -> None:
        user = random.choice(USERS)
        with smtplib.SMTP("127.0.0.1", self.port("submission"), timeout=30) as s:
            s.starttls(context=insecure())
            s.login(user, password(user))
            local = random.choice(PROTECTED)
            rcpts = [f"friend{random.randint(1, 5)}@outside{random.randint(1, 3)}.example", local]
            mid, raw = self.message(", ".join(rcpts))
            raw = raw.replace(b"From: sender@outside.test", f"From: {user}".encode())
            s.sendmail(user, rcpts, raw)
            self.ack(local, mid)

    def imap_session(self) -> None:
        user = random.choice(USERS)
        kind = random.choice(("starttls", "imaps"))
        m: imaplib.IMAP4
        if kind == "imaps":
            m = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"), ssl_context=insecure(), timeout=60)
        else:
            m = imaplib.IMAP4("127.0.0.1", self.port("imap"), timeout=60)
            if kind == "starttls":
                m.starttls(insecure())
        try:
            m.login(user, password(user))
            if random.random() < 0.1:
                m.send(b"a999 FETCH 1:* (BODY.PEEK[])\r\n" if random.random() < 0.5 else b"a999 SEL")
                m.shutdown()
                self.count("imap-dropped")
                return
            m.create("Junk")
            typ, data = m.select("INBOX")
            self.note_uids(m, user, "INBOX")
            n = int(data[0] or 0)
            if n:
                lo = max(1, n - 20)
                m.fetch(f"{lo}:*", "(UID FLAGS RFC822.SIZE ENVELOPE)")
                m.fetch(f"{random.randint(lo, n)}", "(BODY.PEEK[])")
                m.store(f"{random.randint(lo, n)}", "+FLAGS", "(\\Seen)")
                seq = str(random.randint(lo, n))
                typ, _ = m._simple_command("MOVE", seq, "Junk")
                if typ != "OK":
                    raise RuntimeError(f"MOVE {typ}")
                m.select("Junk")
                self.note_uids(m, user, "Junk")
                typ, data = m.search(None, "ALL")
                ids = (data[0] or b"").split()
                if ids:
                    m._simple_command("MOVE", ids[-1].decode(), "INBOX")
                m.select("INBOX")
                if user not in PROTECTED and n > 30:
                    m.store("1:5", "+FLAGS", "(\\Deleted)")
                    m.expunge()
            if random.random() < 0.3:
                mid, raw = self.message(user)
                typ, _ = m.append("INBOX", None, None, raw)
                if typ == "OK":
                    self.ack(user, mid)
            if random.random() < 0.15:
                self.idle(m, random.uniform(5, 40))
            m.logout()
        finally:
            with contextlib.suppress(Exception):
                m.shutdown()

    def note_uids(self, m: imaplib.IMAP4, user: str, folder: str) -> None:
        _, data = m.response("UIDVALIDITY")
        validity = int(data[0]) if data and data[0] else 0
        _, data = m.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
        uids = [int(x) for x in (data[0] or b"").split()]
        with self.lock:
            old = self.uids.get((user, folder), (validity, 0))
            if old[0] != validity:
                self.notes.append(f"UIDVALIDITY of {user}/{folder} changed {old[0]} -> {validity}")
            self.uids[(user, folder)] = (validity, max([old[1], *uids]))

    def idle(self, m: imaplib.IMAP4, secs: float) -> None:
        m.send(b"i1 IDLE\r\n")
        line = m.readline()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE: {line!r}")
        end = time.monotonic() + secs
        while (left := end - time.monotonic()) > 0 and not self.stop.is_set():
            pending = getattr(m.sock, "pending", lambda: 0)()
            if (pending or select.select([m.sock], [], [], min(left, 1.0))[0]) and not m.readline():
                raise RuntimeError("IDLE: connection closed")
        m.send(b"DONE\r\n")
        while not (line := m.readline()).startswith(b"i1 "):
            if not line:
                raise RuntimeError("IDLE: connection closed")
        if b"i1 OK" not in line:
            raise RuntimeError(f"IDLE end: {line!r}")
        self.count("imap-idle")

    def pop3(self) -> None:
        user = random.choice([u for u in USERS if u not in PROTECTED])
        p = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=30)
        try:
            p.stls(insecure())
            p.user(user)
            p.pass_(password(user))
            n, _ = p.stat()
            if n:
                p.retr(random.randint(1, n))
                if random.random() < 0.3 and n > 40:
                    p.dele(1)
            p.quit()
        finally:
            with contextlib.suppress(Exception):
                p.close()

    def web(self) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port("https"), context=insecure(), timeout=60)
        cookies: dict[str, str] = {}

        def request(method: str, path: str, body: dict[str, str] | None = None) -> tuple[int, str]:
            headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
            data = None
            if body is not None:
                data = urllib.parse.urlencode(body)
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                headers["Origin"] = f"https://127.0.0.1:{self.port('https')}"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
            for value in resp.headers.get_all("Set-Cookie") or []:
                name, _, rest = value.partition("=")
                cookies[name] = rest.split(";")[0]
            return resp.status, text

        try:
            status, page = request("GET", "/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page)
            status, page = request("POST", "/login", {"name": "admin", "password": ADMIN_PASSWORD,
                                                      "csrf": token.group(1) if token else ""})
            if status != 303 and status != 302:
                raise RuntimeError(f"web login {status}: {page[:200]}")
            for path in ("/console", "/console/mailboxes", "/console/sending", "/console/domains",
                         f"/console/domains/{random.choice(DOMAINS)}", "/console/events"):
                status, page = request("GET", path)
                if status not in (200, 404):
                    raise RuntimeError(f"{path}: {status}")
            token = re.search(r'name="csrf" value="([^"]+)"', page)
            request("POST", "/logout", {"csrf": token.group(1) if token else ""})
        finally:
            conn.close()

    def storm(self) -> None:
        """Wrong passwords from 127.0.0.2 in minutes 2-3 (four threads); from minute 19 (the 15-minute
        lockout over) the right one must work again."""
        m_ = self.elapsed_min()
        if not (2 <= m_ < 3 or m_ >= 19):
            return
        if m_ >= 19:  # the release: a look every few seconds, not a login flood
            with self.lock:
                if time.monotonic() - self.last_release_check < 5:
                    return
                self.last_release_check = time.monotonic()
        victim = "u19@b.test"
        s = socket.create_connection(("127.0.0.1", self.port("imap")), timeout=30, source_address=("127.0.0.2", 0))
        try:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"t STARTTLS\r\n")
            f.readline()
            s = insecure().wrap_socket(s)
            f = s.makefile("rb")
            right = m_ >= 19
            user = victim if right or random.random() < 0.5 else f"guess{random.randint(1, 500)}@a.test"
            pw = password(victim) if right else "wrong"
            t0 = time.monotonic()
            s.sendall(f'a LOGIN "{user}" "{pw}"\r\n'.encode())
            while not (line := f.readline()).startswith(b"a "):
                if not line:
                    raise RuntimeError("closed")
            took = time.monotonic() - t0
            answer = line.split(b"]")[0].decode(errors="replace")[2:40]
            key = f"storm min {int(m_)} right={right} {answer} ({'>' if took > 1 else '<'}1 s)"
            with self.lock:
                self.storm_answers[key] = self.storm_answers.get(key, 0) + 1
        finally:
            s.close()

    def backup(self) -> None:
        if self.elapsed_min() < self.minutes / 2 or self.backed_up:
            return
        self.backed_up = True
        t0 = time.monotonic()
        out = cli(self.data, "backup", "create")
        with self.lock:
            self.notes.append(f"backup at {self.elapsed_min():.1f} min in {time.monotonic() - t0:.1f}s: {out.strip()[:120]}")

    # --- samples
    def pids(self) -> list[int]:
        assert self.proc is not None
        found, pending = [], [self.proc.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending.extend(int(c) for c in (task / "children").read_text().split())
        return found

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"min": round(self.elapsed_min(), 1)}
        rss = pss = fds = threads = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
                fds += len(os.listdir(f"/proc/{pid}/fd"))
                threads += len(os.listdir(f"/proc/{pid}/task"))
        main = self.pids()[0]
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{main}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    row["main_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
            row["main_fds"] = len(os.listdir(f"/proc/{main}/fd"))
        row.update(procs=len(self.pids()), rss_mib=round(rss / 1024, 1), pss_mib=round(pss / 1024, 1), fds=fds,
                   threads=threads)
        wal = self.data / "letterbox.db-wal"
        row["wal_kib"] = wal.stat().st_size // 1024 if wal.exists() else 0
        tmp = stored = 0
        for dirpath, _, filenames in os.walk(self.data / "mail"):
            base = os.path.basename(dirpath)
            if base == "tmp":
                tmp += len(filenames)
            elif base in ("new", "cur"):
                stored += len(filenames)
        row.update(tmp_files=tmp, stored=stored)
        text = self.log.read_text(errors="replace")
        row["tracebacks"] = text.count("Traceback")
        row["error_lines"] = sum(1 for line in text.splitlines() if " ERROR " in line or "ERROR:" in line)
        with self.lock:
            row["ops"] = sum(self.counts.values())
            row["errs"] = sum(self.errors.values())
        return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--minutes", type=float, default=20)
    args = ap.parse_args()
    soak = Soak(args.root, free_offset(), args.minutes)
    soak.prepare()
    soak.serve()
    soak.start = time.monotonic()
    workers = [("smtp-in", 0.7, soak.smtp_in), ("smtp-in2", 0.7, soak.smtp_in), ("smtp-big", 300, soak.smtp_big),
               ("submission", 4, soak.submission), ("imap", 1.5, soak.imap_session), ("imap2", 3, soak.imap_session),
               ("pop3", 5, soak.pop3), ("web", 6, soak.web), ("backup", 10, soak.backup),
               *[(f"storm{i}", 0.2, soak.storm) for i in range(4)]]
    threads = [threading.Thread(target=soak.loop, args=w, daemon=True, name=w[0]) for w in workers]
    for t in threads:
        t.start()
    samples = soak.root / "samples.jsonl"
    while soak.elapsed_min() < args.minutes:
        row = soak.sample()
        print(json.dumps(row), flush=True)
        with samples.open("a") as f:
            f.write(json.dumps(row) + "\n")
        time.sleep(max(0.0, 60 - (soak.elapsed_min() * 60) % 60))
    # SIGKILL under load, then the same data again.
    assert soak.proc is not None
    soak.proc.send_signal(signal.SIGKILL)
    soak.proc.wait()
    killed_at = soak.elapsed_min()
    time.sleep(3)
    soak.stop.set()
    for t in threads:
        t.join(120)
    with soak.lock:
        errors_before = dict(soak.errors)
    report: dict[str, Any] = {"killed_at_min": round(killed_at, 2), "counts": soak.counts, "errors": errors_before,
                              "notes": soak.notes, "storm": soak.storm_answers}
    (soak.root / "acked.json").write_text(json.dumps(soak.acked))
    (soak.root / "uids.json").write_text(json.dumps({f"{u}/{f}": v for (u, f), v in soak.uids.items()}))
    report["after"] = check_after(soak)
    (soak.root / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def maildir_mids(user_dir: Path) -> tuple[dict[str, int], int]:
    """Message-IDs in every folder's new/ and cur/ (count of each), and files in tmp/ dirs."""
    found: dict[str, int] = {}
    tmp = 0
    for dirpath, _, filenames in os.walk(user_dir):
        base = os.path.basename(dirpath)
        if base == "tmp":
            tmp += len(filenames)
            continue
        if base not in ("new", "cur"):
            continue
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                head = f.read(4096)
            m = re.search(rb"Message-ID: (<[^>]+>)", head)
            if m:
                found[m.group(1).decode()] = found.get(m.group(1).decode(), 0) + 1
    return found, tmp


def check_after(soak: Soak) -> dict[str, Any]:
    soak.serve()
    out: dict[str, Any] = {}
    mail = soak.data / "mail"
    problems: list[str] = []
    for user in USERS:
        local, domain = user.split("@")
        candidates = [p for p in mail.rglob(local) if p.is_dir() and domain in str(p)]
        if not candidates:
            problems.append(f"no maildir for {user}")
            continue
        mids, tmp = maildir_mids(candidates[0])
        for mid, n in mids.items():
            if n > 1:
                problems.append(f"{user}: {mid} x{n}")
        if user in PROTECTED:
            missing = [mid for mid in soak.acked.get(user, []) if mid not in mids]
            if missing:
                problems.append(f"{user}: {len(missing)} acknowledged missing, e.g. {missing[:3]}")
        if tmp:
            out.setdefault("tmp_after", {})[user] = tmp
    # UIDVALIDITY kept, UIDs not reused, logins work; IMAP sees what the disk has.
    for (user, folder), (validity, max_uid) in sorted(soak.uids.items()):
        m = imaplib.IMAP4("127.0.0.1", soak.port("imap"), timeout=60)
        m.starttls(insecure())
        m.login(user, password(user))
        m.select(folder)
        _, data = m.response("UIDVALIDITY")
        if int(data[0]) != validity:
            problems.append(f"{user}/{folder}: UIDVALIDITY {validity} -> {data[0]!r}")
        m.append(folder, None, None, soak.message(user)[1])
        m.select(folder)
        _, data = m.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
        uids = [int(x) for x in (data[0] or b"").split()]
        if uids and max(uids) <= max_uid:
            problems.append(f"{user}/{folder}: new APPEND got UID {max(uids)} <= {max_uid} seen before")
        m.logout()
    out["problems"] = problems
    out["log_after_restart"] = [line for line in soak.log.read_text(errors="replace").splitlines()[-400:]
                                if "queue" in line.lower() or "error" in line.lower()][-20:]
    assert soak.proc is not None
    soak.proc.terminate()
    soak.proc.wait(30)
    out["queue"] = subprocess.run([LETTERBOX, "--data", str(soak.data), "queue", "list"], capture_output=True,
                                  text=True).stdout[-1500:]
    return out


if __name__ == "__main__":
    main()
