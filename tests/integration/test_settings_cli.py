"""`letterbox settings list|set` against a running box: the settings the README names (dns_resolver,
queue_hold...) are set from another process, in force without a restart, and bad input saves nothing."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import LETTERBOX
from tests.support.dns_server import ZoneServer
from tests.support.outbound import MX2, Outbound, mx, outbound_fixture, zone_fixture  # noqa: F401  (fixtures)


def letterbox(outbound: Outbound, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(outbound.box.data.root), *args], capture_output=True, text=True,
                          timeout=60)


def settings_rows(outbound: Outbound) -> dict[str, str]:
    rows = outbound.box.run(outbound.box.services.db.fetchall("SELECT key, value FROM settings"))
    return {str(r["key"]): str(r["value"]) for r in rows}


def test_queue_hold_set_from_the_cli_holds_and_releases_the_running_queue(outbound: Outbound) -> None:
    mx(outbound.zone, "far-away.test", (10, "mx.far-away.test", MX2))
    listed = letterbox(outbound, "settings", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()}
    assert lines["queue_hold"] == "off"
    assert lines["dns_resolver"] == outbound.zone.address
    assert set(lines) == {"dns_resolver", "port25_probe", "status_checks", "delivery_log", "delivery_log_days",
                          "queue_hold"}

    with outbound.receiver(MX2) as direct:
        held = letterbox(outbound, "settings", "set", "queue_hold", "on")
        assert held.returncode == 0, held.stderr
        outbound.stays_queued("held@far-away.test", direct)

        released = letterbox(outbound, "settings", "set", "queue_hold", "off")
        assert released.returncode == 0, released.stderr
        # No wake from here: the running box's own poll reads the hold lifted.
        assert [t.rcpt_tos for t in direct.wait(1)] == [("held@far-away.test",)]
        outbound.wait_empty()


def test_dns_resolver_set_from_the_cli_is_asked_for_the_next_message(outbound: Outbound) -> None:
    """The fixture's zone knows nothing of far-away.test; a second loopback DNS server does."""
    with ZoneServer(ttl=0) as other, outbound.receiver(MX2) as direct:
        mx(other, "far-away.test", (10, "mx.far-away.test", MX2))
        result = letterbox(outbound, "settings", "set", "dns_resolver", other.address)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"dns_resolver = {other.address}")
        outbound.submit(["someone@far-away.test"])
        assert [t.rcpt_tos for t in direct.wait(1)] == [("someone@far-away.test",)]


@pytest.mark.parametrize(("args", "accepted"), [
    (("nosuch", "1"), "the settable ones are dns_resolver, port25_probe"),
    (("dns_resolver", "resolver.example"), "an address[:port]"),
    (("dns_resolver", "127.0.0.1:99999"), "an address[:port]"),
    # Addresses no DNS server answers from: every lookup of the box (MX, checks, blocklists) failed.
    (("dns_resolver", "0.0.0.0"), "an address[:port]"),
    (("dns_resolver", "[::]:53"), "an address[:port]"),
    (("dns_resolver", "224.0.0.1"), "an address[:port]"),
    (("dns_resolver", "255.255.255.255"), "an address[:port]"),
    (("dns_resolver", "ff02::1"), "an address[:port]"),
    (("dns_resolver", "127.0.0.1:5_3"), "an address[:port]"),
    (("delivery_log_days", "0"), "from 1 to 3650"),
    (("delivery_log_days", "ten"), "from 1 to 3650"),
    (("queue_hold", "maybe"), "on or off"),
    (("status_checks", ""), "on or off"),
    (("port25_probe", "mx.example.net"), "host:port"),
    (("port25_probe", "bad name!:25"), "host:port"),
])
def test_bad_input_is_refused_with_what_is_accepted_and_nothing_saved(
        outbound: Outbound, args: tuple[str, str], accepted: str) -> None:
    before = settings_rows(outbound)
    result = letterbox(outbound, "settings", "set", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    assert line.startswith("letterbox: "), line
    assert accepted in line, line
    assert line.endswith("nothing was saved"), line
    assert result.stdout == ""
    assert settings_rows(outbound) == before
