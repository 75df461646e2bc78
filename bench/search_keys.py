"""SEARCH programs of many keys (issue 19's leftovers): what a key costs when a program has a thousand,
against the same program's one key. A real `letterbox serve` with one folder of N messages (bench.imap's),
then each program twice (the second after the message cache is warm); per program the wall time and the
server's CPU (user + system of the process and its worker, from /proc). With --dovecot, the same
programs against a private Dovecot on the same messages, for its answers (a program it refuses shows
its tagged reply) and its times.

    python -m bench.search_keys [--messages 5000] [--keys 1000] [--dovecot]

Every key of the many-key programs is evaluated for every message (NOT of a needle no message holds, or
an OR of such keys), the worst case for a program: an AND stops at its first failing key.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from bench.benchbox import cpu_seconds
from bench.imap import PASSWORD, USER, Client, box_of, write_messages
from bench.search import client_context


def or_tree(keys: list[str]) -> str:
    """A balanced OR of the keys: depth log2(len), so the parser's nesting bound does not refuse it."""
    if len(keys) == 1:
        return keys[0]
    half = len(keys) // 2
    return f"OR ({or_tree(keys[:half])}) ({or_tree(keys[half:])})"


def programs(count: int) -> dict[str, str]:
    absent = [f"x{n}" for n in range(count)]
    return {
        "SUBJECT x0": "SEARCH SUBJECT x0",
        f"{count} x NOT SUBJECT xN": "SEARCH " + " ".join(f"NOT SUBJECT {a}" for a in absent),
        f"OR tree of {count} SUBJECT xN": "SEARCH " + or_tree([f"SUBJECT {a}" for a in absent]),
        "FROM x0": "SEARCH FROM x0",
        f"{count} x NOT FROM xN": "SEARCH " + " ".join(f"NOT FROM {a}" for a in absent),
        "HEADER Message-ID x0": "SEARCH HEADER Message-ID x0",
        f"{count} x NOT HEADER Message-ID xN": "SEARCH " + " ".join(f"NOT HEADER Message-ID {a}" for a in absent),
        f"{count} x NOT (SUBJECT|FROM|TO) xN": "SEARCH " + " ".join(
            f"NOT {('SUBJECT', 'FROM', 'TO')[n % 3]} {a}" for n, a in enumerate(absent)),
        f"{count} x NOT SENTBEFORE": "SEARCH " + " ".join("NOT SENTBEFORE 1-Jan-2000" for _ in absent),
        f"{count} x NOT BODY xN": "SEARCH " + " ".join(f"NOT BODY {a}" for a in absent),
    }


async def run(port: int, plain: bool, queries: dict[str, str], cpu: Callable[[], float]) -> dict[str, list[str]]:
    client = await Client.connect(port, None if plain else client_context())
    await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
    await client.command("SELECT INBOX")
    await client.command("FETCH 1:* (FLAGS)")
    out: dict[str, list[str]] = {}
    for label, query in queries.items():
        cells = []
        for _ in range(2):
            before, started = cpu(), time.perf_counter()
            try:
                count, _ = await client.command(query)
                answer = f"{count} lines"
            except RuntimeError as e:
                answer = str(e).rpartition(": ")[2][:60]
            cells.append(f"{time.perf_counter() - started:7.2f} s wall {cpu() - before:7.2f} s cpu ({answer})")
        out[label] = cells
    await client.command("LOGOUT")
    await client.close()
    return out


def letterbox(messages: int, queries: dict[str, str]) -> dict[str, list[str]]:
    with box_of(messages) as (port, proc):
        return asyncio.run(run(port, False, queries, lambda: cpu_seconds(proc.pid)))


def dovecot(messages: int, queries: dict[str, str]) -> dict[str, list[str]]:
    from tests.support.dovecot import private_dovecot
    with private_dovecot({USER: PASSWORD}) as server:
        write_messages(server.maildir(USER), messages)
        server.start()
        assert server._pid is not None
        pid = server._pid
        return asyncio.run(run(server.port, True, queries, lambda: cpu_seconds(pid)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--dovecot", action="store_true")
    args = parser.parse_args()
    queries = programs(args.keys)
    servers = {"letterbox": letterbox} | ({"dovecot": dovecot} if args.dovecot else {})
    for name, measure in servers.items():
        print(f"{name}: {args.messages:,} messages, first run then second")
        for label, cells in measure(args.messages, queries).items():
            print(f"  {label:38} " + " | ".join(cells))


if __name__ == "__main__":
    main()
