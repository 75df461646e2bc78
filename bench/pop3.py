"""POP3 benchmark against a real `letterbox serve` over implicit TLS (995):

1. A 10,000-message maildrop: time of the first login (the files were put into the Maildir by another
   program, so it indexes them all), of later logins (argon2id check + INBOX snapshot), and of STAT +
   UIDL (the full unique-id listing) on the wire.
2. RETR throughput in MB/s: many medium messages one after another, then one large message, with the
   server's peak RSS (RETR streams from the file, so a 50 MB message must not add 50 MB).

Usage: python -m bench.pop3 [--messages 10000] [--medium 200] [--medium-kib 256] [--large-mib 50]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.benchbox import cli, free_offset, peak_rss_kib, serving

POP3S_PORT = 995
DOMAIN = "bench.test"
USER = f"pop@{DOMAIN}"
PASSWORD = "bench password 1234567"
END = b"\r\n.\r\n"


def message(n: int, size: int) -> bytes:
    head = f"From: sender{n}@example.org\r\nTo: {USER}\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b".dotted line, stuffed on the way out " + b"x" * 38 + b"\r\n"  # 77 octets
    return head + line * max(1, (size - len(head)) // len(line))


def fill_maildir(maildir: Path, count: int, size: int, start: int = 0) -> int:
    """Files written straight into new/ the way another MDA would; returns their total size."""
    total = 0
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for n in range(start, start + count):
        data = message(n, size)
        (maildir / "new" / f"1700000000.M{n:06d}P1.bench,S={len(data)}").write_bytes(data)
        total += len(data)
    return total


class Client:
    """A minimal POP3 client on a TLS socket, reading multi-line replies in big pieces."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""
        self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        self.buffer += chunk

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text.split()[0]}: {reply!r}")
        return reply

    def multiline(self, text: str) -> int:
        """Send a command with a multi-line reply; returns the octets of the body received."""
        self.command(text)
        parts = [self.buffer]
        size = len(self.buffer)
        tail = self.buffer[-5:]
        while not (b"\r\n" + tail).endswith(END):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            parts.append(chunk)
            size += len(chunk)
            tail = (tail + chunk)[-5:]
        self.buffer = b""
        return size

    def login(self) -> None:
        self.command(f"USER {USER}")
        self.command(f"PASS {PASSWORD}")

    def quit(self) -> None:
        self.command("QUIT")
        self.sock.close()


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="maildrop size for STAT+UIDL")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message of the big maildrop")
    parser.add_argument("--medium", type=int, default=200, help="messages in the RETR run")
    parser.add_argument("--medium-kib", type=int, default=256)
    parser.add_argument("--large-mib", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="letterbox-bench-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN)
        cli(data, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        maildir = data / "mail" / DOMAIN / "pop"
        fill_maildir(maildir, args.messages, args.size)
        with serving(data, Path(tmp) / "serve.log", offset := free_offset()) as proc:
            context = ssl.create_default_context(cafile=str(data / "tls" / "cert.pem"))
            port = POP3S_PORT + offset

            # 1. STAT + UIDL on the big maildrop.
            client = Client(port, context)
            first_login = timed(client.login)
            client.quit()
            logins, stat_uidl = [], []
            uidl_octets = 0
            for _ in range(5):
                client = Client(port, context)
                logins.append(timed(client.login))
                started = time.perf_counter()
                count = int(client.command("STAT").split()[1])
                uidl_octets = client.multiline("UIDL")
                stat_uidl.append(time.perf_counter() - started)
                client.quit()
            if count != args.messages:
                raise SystemExit(f"STAT says {count} messages, expected {args.messages}")

            # 2. RETR throughput: a maildrop of medium messages plus one large one.
            cli(data, "user", "add", f"retr@{DOMAIN}", "--password-stdin", stdin=PASSWORD + "\n")
            retr_dir = data / "mail" / DOMAIN / "retr"
            medium_total = fill_maildir(retr_dir, args.medium, args.medium_kib * 1024)
            large_total = fill_maildir(retr_dir, 1, args.large_mib * 1024 * 1024, start=args.medium)
            rss_before = peak_rss_kib(proc.pid)
            client = Client(port, context)
            client.command(f"USER retr@{DOMAIN}")
            client.command(f"PASS {PASSWORD}")
            started = time.perf_counter()
            received = sum(client.multiline(f"RETR {n}") for n in range(1, args.medium + 1))
            medium_time = time.perf_counter() - started
            started = time.perf_counter()
            large_received = client.multiline(f"RETR {args.medium + 1}")
            large_time = time.perf_counter() - started
            client.quit()
            rss_after = peak_rss_kib(proc.pid)

    mb = 1_000_000
    print(f"pop3 over TLS (995), maildrop of {args.messages} messages x {args.size} B")
    print(f"  first login (indexes {args.messages} new files) {first_login * 1000:8.0f} ms")
    print(f"  login (argon2id + snapshot), median  {sorted(logins)[len(logins) // 2] * 1000:8.0f} ms")
    print(f"  STAT + UIDL ({uidl_octets} octets), median {sorted(stat_uidl)[len(stat_uidl) // 2] * 1000:8.0f} ms")
    print(f"  RETR {args.medium} x {args.medium_kib} KiB   {medium_total / mb / medium_time:8.1f} MB/s "
          f"({received / mb:.1f} MB on the wire in {medium_time:.2f} s)")
    print(f"  RETR 1 x {args.large_mib} MiB        {large_total / mb / large_time:8.1f} MB/s "
          f"({large_received / mb:.1f} MB on the wire in {large_time:.2f} s)")
    print(f"  server peak RSS      {rss_after / 1024:8.1f} MiB (before the RETR run {rss_before / 1024:.1f} MiB)")


if __name__ == "__main__":
    main()
