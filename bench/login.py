"""IMAP LOGIN cost over TLS on loopback against a real `letterbox serve`: a new connection per login,
as a phone reconnecting does, with imaplib. The first login of each account checks the password with
argon2id; the next ones within the login cache's lifetime are served from the cache (login_cache.py).

Prints the LOGIN command's time (sent -> tagged OK) and connect+TLS+LOGIN, median and max.
Usage: python -m bench.login [--accounts 5] [--logins 20]
"""

from __future__ import annotations

import argparse
import imaplib
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from bench.benchbox import cli, free_offset, serving

IMAPS_PORT = 993
DOMAIN = "bench.test"
PASSWORD = "bench password 1234567"


def one_login(port: int, context: ssl.SSLContext, user: str) -> tuple[float, float]:
    started = time.perf_counter()
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=60) as imap:
        sent = time.perf_counter()
        imap.login(user, PASSWORD)
        done = time.perf_counter()
        imap.logout()
    return done - sent, done - started


def line(label: str, samples: list[float]) -> str:
    return (f"  {label:<34} median {statistics.median(samples) * 1000:7.1f} ms   "
            f"max {max(samples) * 1000:7.1f} ms   (n={len(samples)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--logins", type=int, default=20, help="cached logins per account")
    args = parser.parse_args()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the box's own self-signed certificate, on loopback
    users = [f"user{n}@{DOMAIN}" for n in range(args.accounts)]
    with tempfile.TemporaryDirectory(prefix="letterbox-bench-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN)
        for user in users:
            cli(data, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
        with serving(data, Path(tmp) / "serve.log", offset := free_offset(), hostname="bench.test"):
            port = IMAPS_PORT + offset
            first = [one_login(port, context, user) for user in users]
            again = [one_login(port, context, user) for _ in range(args.logins) for user in users]
    print("IMAP LOGIN over TLS on loopback, a new connection per login")
    print(line("first login (argon2id) LOGIN", [a for a, _ in first]))
    print(line("first login connect+TLS+LOGIN", [b for _, b in first]))
    print(line("again (login cache) LOGIN", [a for a, _ in again]))
    print(line("again (login cache) connect+TLS+LOGIN", [b for _, b in again]))


if __name__ == "__main__":
    main()
