"""SEARCH BODY/TEXT benchmark, side by side with Dovecot (Debian's dovecot-imapd, no fts plugin: it
reads the files) on the same N messages (bench.imap's 2 KB multipart messages), both over TLS.

For each size: Letterbox's full-text index build time after the first SELECT (the Maildir copied in,
as from another server), its size on disk against the text it holds and against the unicode61
tokenizer (words only, no substrings) on the same text, then interleaved rounds (Letterbox, Dovecot,
Letterbox, ...) of each query, medians of the rounds and the ratio. `SEARCH BODY zq` has a needle too
short for trigrams: it measures Letterbox's scan of the files (the path of not yet indexed mail).
Usage: python -m bench.search [--sizes 1000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trustme

from appliance.imap.search import searched_texts
from bench.benchbox import cli, free_offset, peak_rss_kib, serving
from bench.imap import DOMAIN, IMAPS, PASSWORD, USER, Client, write_messages
from tests.support.dovecot import private_dovecot

QUERIES = [
    "SEARCH BODY tempor",  # in every message
    "SEARCH BODY zyxwvuts",  # in none
    'SEARCH TEXT "number 4"',  # the subject of a few
    "SEARCH BODY zq",  # too short for the index: every file scanned
]
INDEX_TIMEOUT = 3600.0
SIZE_SAMPLE = 2000  # messages whose text is indexed twice to compare the tokenizers


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # both servers' certificates are made up, on loopback
    return context


async def session(port: int) -> Client:
    client = await Client.connect(port, client_context())
    await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
    await client.command("SELECT INBOX")
    return client


async def timed(client: Client, query: str) -> float:
    started = time.perf_counter()
    await client.command(query)
    return time.perf_counter() - started


def indexed_uid(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT COALESCE(MAX(indexed_uid), 0) FROM message_text_folders").fetchone()
        return int(row[0])
    finally:
        conn.close()


def index_sizes(db: Path, maildir: Path) -> tuple[int, int, int, int]:
    """(FTS5 octets, text octets held, trigram octets and unicode61 octets for SIZE_SAMPLE messages)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        fts = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'message_text%'").fetchone()[0]
        text = conn.execute("SELECT SUM(LENGTH(CAST(header AS BLOB)) + LENGTH(CAST(body AS BLOB)))"
                            " FROM message_text").fetchone()[0]
    finally:
        conn.close()
    texts = [searched_texts(p.read_bytes()) for p in sorted((maildir / "cur").iterdir())[:SIZE_SAMPLE]]
    sizes = []
    for tokenizer in ("trigram case_sensitive 1", "unicode61"):
        with tempfile.NamedTemporaryFile(suffix=".db") as f:
            sample = sqlite3.connect(f.name)
            sample.execute(f"CREATE VIRTUAL TABLE t USING fts5(header, body, tokenize = '{tokenizer}')")
            with sample:
                sample.executemany("INSERT INTO t (header, body) VALUES (?, ?)", texts)
            sample.execute("VACUUM")
            sample.close()
            sizes.append(os.path.getsize(f.name))
    return int(fts or 0), int(text or 0), sizes[0], sizes[1]


async def rounds(letterbox: int, dovecot: int, count: int) -> dict[str, dict[str, list[float]]]:
    lb, dc = await session(letterbox), await session(dovecot)
    times: dict[str, dict[str, list[float]]] = {q: {"letterbox": [], "dovecot": []} for q in QUERIES}
    for _ in range(count):
        for query in QUERIES:
            times[query]["letterbox"].append(await timed(lb, query))
            times[query]["dovecot"].append(await timed(dc, query))
    for client in (lb, dc):
        await client.command("LOGOUT")
        await client.close()
    return times


def run_size(size: int, count: int) -> None:
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="letterbox-bench-search-") as tmp, \
            private_dovecot({USER: PASSWORD}, tls=_dovecot_cert(ca, Path(tmp))) as dovecot:
        data = Path(tmp) / "data"
        cli(data, "domain", "add", DOMAIN)
        cli(data, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        maildir = data / "mail" / DOMAIN / USER.split("@")[0]
        write_messages(maildir, size)
        write_messages(dovecot.maildir(USER), size)
        dovecot.start()
        with serving(data, Path(tmp) / "serve.log", offset := free_offset(), hostname="bench.test") as proc:
            started = time.perf_counter()
            asyncio.run(_select(IMAPS + offset))
            asyncio.run(_select(dovecot.tls_port))  # Dovecot builds its own index on first SELECT
            while indexed_uid(data / "letterbox.db") < size:
                if time.perf_counter() - started > INDEX_TIMEOUT:
                    raise SystemExit("the full-text index was not built in time")
                time.sleep(0.5)
            build = time.perf_counter() - started
            times = asyncio.run(rounds(IMAPS + offset, dovecot.tls_port, count))
            rss = peak_rss_kib(proc.pid)
        fts, text, trigram, unicode61 = index_sizes(data / "letterbox.db", maildir)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"search: {size:,} messages, {count} interleaved rounds, medians ({load})")
    print(f"  index build after the first SELECT: {build:.1f} s ({size / build:.0f} messages/s)")
    print(f"  index size: {fts / 1e6:.1f} MB for {text / 1e6:.1f} MB of text ({fts / max(text, 1):.1f}x);"
          f" tokenizers on {min(size, SIZE_SAMPLE)} messages: trigram {trigram / 1e6:.2f} MB,"
          f" unicode61 {unicode61 / 1e6:.2f} MB ({trigram / max(unicode61, 1):.1f}x)")
    print(f"  {'query':28}{'letterbox':>12}{'dovecot':>12}{'ratio':>8}   paired ratios")
    for query, both in times.items():
        lb, dc = statistics.median(both["letterbox"]), statistics.median(both["dovecot"])
        paired = ", ".join(f"{a / b:.2f}" for a, b in zip(both["letterbox"], both["dovecot"], strict=True))
        print(f"  {query:28}{lb * 1000:>10.0f}ms{dc * 1000:>10.0f}ms{lb / dc:>7.2f}x   {paired}")
    print(f"  letterbox server peak RSS {rss / 1024:.0f} MiB")


async def _select(port: int) -> None:
    client = await session(port)
    await client.command("LOGOUT")
    await client.close()


def _dovecot_cert(ca: trustme.CA, tmp: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp / "dovecot.crt", tmp / "dovecot.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.chmod(0o644)
    key_file.chmod(0o600)
    return cert_file, key_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        run_size(size, args.rounds)


if __name__ == "__main__":
    main()
