"""Dovecot's imaptest scripted tests against Letterbox and, as the baseline, a private Dovecot.

imaptest (https://github.com/dovecot/imaptest) is in no package registry, so it is not part of `make
test`: build it once outside the repository, against Debian's dovecot-dev (Dovecot 2.3.19):

    apt-get install -y dovecot-dev build-essential autoconf automake libtool pkg-config
    git clone -b release-2.3 https://github.com/dovecot/imaptest /work/tools/imaptest-src
    cd /work/tools/imaptest-src
    # bookworm's security update gave imap_parser_create() a 4th argument (struct imap_parser_params)
    sed -i '/imap_parser_create(/s/(size_t)-1);/(size_t)-1, \\&(const struct imap_parser_params){ 0 });/' \\
        src/commands.c src/test-parser.c src/imap-client.c
    ./autogen.sh
    ./configure --with-dovecot=/usr/lib/dovecot --prefix=/work/tools/imaptest \\
        LDFLAGS=-Wl,-rpath,/usr/lib/dovecot
    make -j2 install

Then run every test group (one imaptest run per group file, so each gets its own verdict) over TLS:

    IMAPTEST=/work/tools/imaptest/bin/imaptest IMAPTEST_TESTS=/work/tools/imaptest-src/src/tests \\
        .venv/bin/python -m bench.imaptest [--server both|letterbox|dovecot] [--groups fetch,listext]

It prints one row per group (passed, FAILED with failed/total commands, or skipped because the server
lacks a capability the group needs), the totals, and keeps imaptest's failure details in --logs.
Without IMAPTEST it says so and exits 0 (`make bench` runs every script). Exit status 1 when a group
that passes on Dovecot does not pass on Letterbox (fails, or is skipped for a missing extension).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench.benchbox import cli, free_offset, serving
from tests.support.dovecot import private_dovecot

IMAPS = 993
DOMAIN = "imaptest.test"
USERS = (f"tester@{DOMAIN}", f"tester2@{DOMAIN}")
PASSWORD = "imaptest password 1234"
GROUP_TIMEOUT = 120.0
_SUMMARY = re.compile(r"(\d+) test groups: (\d+) failed, (\d+) skipped")
_COMMANDS = re.compile(r"(base protocol|extensions): (\d+)/(\d+) individual commands failed")


@dataclass(frozen=True)
class Verdict:
    """One group on one server: `state` is passed, FAILED, skipped, or ERROR (imaptest gave no summary)."""

    state: str
    failed_commands: int = 0
    commands: int = 0

    def cell(self) -> str:
        if self.state in ("passed", "FAILED"):
            return f"{self.state} {self.commands - self.failed_commands}/{self.commands}"
        return self.state


def verdict_of(output: str) -> Verdict:
    summary = _SUMMARY.search(output)
    if summary is None:
        return Verdict("ERROR")
    failed_commands = commands = 0
    for match in _COMMANDS.finditer(output):
        failed_commands += int(match.group(2))
        commands += int(match.group(3))
    if int(summary.group(2)):
        return Verdict("FAILED", failed_commands, commands)
    # imaptest leaves its "skipped" count at 0 for a group whose capabilities the server lacks: it runs
    # none of its commands, which is how a skip shows here.
    if int(summary.group(3)) or commands == 0:
        return Verdict("skipped")
    return Verdict("passed", failed_commands, commands)


def test_groups(tests: Path, only: set[str]) -> list[Path]:
    """imaptest's group files: every file of its tests directory except the .mbox message sources."""
    return sorted(p for p in tests.iterdir()
                  if p.is_file() and p.suffix != ".mbox" and not p.name.startswith(".")
                  and (not only or p.name in only))


def run_group(imaptest: str, port: int, group: Path, log: Path) -> Verdict:
    args = [imaptest, "host=127.0.0.1", f"port={port}", "ssl=any-cert", f"user={USERS[0]}",
            f"user2={USERS[1]}", f"pass={PASSWORD}", f"test={group}"]
    try:
        result = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=GROUP_TIMEOUT,
                                check=False)
    except subprocess.TimeoutExpired:
        log.write_text(f"{' '.join(args)}\ntimed out after {GROUP_TIMEOUT} s\n")
        return Verdict("ERROR")
    log.write_text(f"{' '.join(args)}\n{result.stdout}\n{result.stderr}")
    return verdict_of(result.stdout)


@contextlib.contextmanager
def letterbox_port(work: Path) -> Iterator[int]:
    data = work / "letterbox-data"
    cli(data, "domain", "add", DOMAIN)
    for user in USERS:
        cli(data, "user", "add", user, "--password-stdin", stdin=PASSWORD + "\n")
    offset = free_offset()
    with serving(data, work / "letterbox.log", offset):
        yield IMAPS + offset


@contextlib.contextmanager
def dovecot_port(work: Path) -> Iterator[int]:
    cert, key = work / "dovecot-cert.pem", work / "dovecot-key.pem"
    issued = trustme.CA().issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    with private_dovecot(dict.fromkeys(USERS, PASSWORD), tls=(cert, key)) as server:
        server.start()
        yield server.tls_port


SERVERS = {"dovecot": dovecot_port, "letterbox": letterbox_port}


def run_server(name: str, imaptest: str, groups: list[Path], work: Path, logs: Path) -> dict[str, Verdict]:
    verdicts = {}
    with SERVERS[name](work) as port:
        for group in groups:
            verdicts[group.name] = run_group(imaptest, port, group, logs / f"{name}-{group.name}.log")
            print(f"  {name:9} {group.name:32} {verdicts[group.name].cell()}", file=sys.stderr, flush=True)
    return verdicts


def totals(verdicts: dict[str, Verdict]) -> str:
    states = [v.state for v in verdicts.values()]
    failed = sum(v.failed_commands for v in verdicts.values())
    commands = sum(v.commands for v in verdicts.values() if v.state in ("passed", "FAILED"))
    return (f"{states.count('passed')} passed, {states.count('FAILED')} failed, {states.count('skipped')} "
            f"skipped, {states.count('ERROR')} errors; {failed}/{commands} commands failed")


def print_table(results: dict[str, dict[str, Verdict]], groups: list[Path]) -> None:
    names = list(results)
    print("| group | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for group in groups:
        print(f"| {group.name} | " + " | ".join(results[n][group.name].cell() for n in names) + " |")
    for name in names:
        print(f"{name}: {totals(results[name])}")


def regressions(results: dict[str, dict[str, Verdict]]) -> list[str]:
    """Groups Dovecot passes that Letterbox does not (passed or skipped alike: a skip there is a missing
    extension)."""
    if not {"dovecot", "letterbox"} <= results.keys():
        return [g for g, v in results.get("letterbox", {}).items() if v.state in ("FAILED", "ERROR")]
    return [g for g, v in results["dovecot"].items()
            if v.state == "passed" and results["letterbox"][g].state != "passed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("both", "letterbox", "dovecot"), default="both")
    parser.add_argument("--groups", default="", help="comma-separated group names (default: all)")
    parser.add_argument("--logs", type=Path, help="directory for imaptest's output per group (default: a temp dir)")
    args = parser.parse_args()
    imaptest = os.environ.get("IMAPTEST")
    if not imaptest:
        print("bench.imaptest: IMAPTEST is not set (see `python -m bench.imaptest --help` to build it); skipped")
        return 0
    tests = Path(os.environ.get("IMAPTEST_TESTS", Path(imaptest).resolve().parents[2] / "imaptest-src/src/tests"))
    groups = test_groups(tests, {g for g in args.groups.split(",") if g})
    names = ["dovecot", "letterbox"] if args.server == "both" else [args.server]
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-imaptest-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-imaptest-") as tmp:
        results = {}
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            results[name] = run_server(name, imaptest, groups, work, logs)
        print_table(results, groups)
        bad = regressions(results)
        if bad:
            print(f"letterbox does not pass: {', '.join(bad)} (details in {logs})")
        return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
