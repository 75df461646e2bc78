"""appliance/settings.py: the typed reading of every setting, its encoding, and live values across
connections (issue 12)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.queue.smarthost import Smarthost
from appliance.settings import (
    KNOWN_KEYS,
    SETTABLE,
    SettingError,
    Settings,
    SettingValues,
    decode,
    encode,
    parse_setting,
)


def test_defaults_when_nothing_is_stored() -> None:
    values = decode({}, default_hostname="box.local")
    assert values.hostname == "box.local"
    assert not values.hostname_stored
    assert values.public_ipv4 is None
    assert values.mx_port == 25
    assert values.relay is None
    assert values.inbound_auth
    assert values.dmarc_reject
    assert not values.hold
    assert values.dns_resolver is None
    assert values.setup_step is None


def test_invalid_values_fall_back_and_an_invalid_relay_is_explained() -> None:
    values = decode({"outbound_port": "x", "dns_resolver": "not an address", "queue_max_age": "soon",
                     "smarthost_host": "relay.test", "smarthost_port": "many"}, default_hostname="b.local")
    assert values.mx_port == 25
    assert values.dns_resolver is None
    assert values.retry.max_age is None
    assert values.relay is None
    assert "not a number" in values.relay_problem


def test_every_written_field_reads_back() -> None:
    relay = Smarthost("relay.test", 2525, "implicit", "me", "pw", "/ca.pem")
    rows = encode({"hostname": "mail.example.test", "public_ipv4": "192.0.2.1", "hold": True, "mx_port": 2525,
                   "dns_resolver": "127.0.0.1:5353", "inbound_auth": False, "dmarc_reject": False,
                   "relay": relay, "relay_tested": relay.describe(), "setup_step": 5, "setup_done": True,
                   "setup_domain": "example.test", "setup_domain_added": True})
    assert set(rows) <= set(KNOWN_KEYS)
    values = decode(rows, default_hostname="b.local")
    assert (values.hostname, values.public_ipv4, values.hold, values.mx_port) == ("mail.example.test", "192.0.2.1",
                                                                               True, 2525)
    assert (values.dns_resolver, values.inbound_auth, values.dmarc_reject) == ("127.0.0.1:5353", False, False)
    assert values.relay == relay
    assert values.relay_tested == relay.describe()
    assert (values.setup_step, values.setup_done, values.setup_domain, values.setup_domain_added) == (
        5, True, "example.test", True)
    assert decode(encode({"relay": None}), default_hostname="b").relay is None


def test_a_commit_by_another_connection_is_seen_at_the_next_use(tmp_path: Path) -> None:
    """The CLI is another process with its own connection: PRAGMA data_version tells the box."""
    async def run() -> tuple[SettingValues, SettingValues, list[bool]]:
        box_db = await Database.open(tmp_path / "db.sqlite")
        cli_db = await Database.open(tmp_path / "db.sqlite")
        try:
            box = await Settings.load(box_db, default_hostname="b.local")
            seen: list[bool] = []
            box.subscribe(lambda before, after: seen.append(after.hold))
            before = await box.fresh()
            await Settings(cli_db, default_hostname="b.local").save(hold=True)
            return before, await box.fresh(), seen
        finally:
            await cli_db.close()
            await box_db.close()

    before, after, seen = asyncio.run(run())
    assert not before.hold
    assert after.hold
    assert seen == [True]


def test_hostname_override_holds_until_a_rename(tmp_path: Path) -> None:
    async def run() -> list[str]:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            await db.set_setting("hostname", "stored.example.test")
            settings = await Settings.load(db, default_hostname="b.local", hostname_override="flag.example.test")
            names = [settings.now.hostname]
            await settings.save(hostname="renamed.example.test")
            names.append(settings.now.hostname)
            return names
        finally:
            await db.close()

    assert asyncio.run(run()) == ["flag.example.test", "renamed.example.test"]


def test_each_settable_name_writes_its_own_key_and_reads_back_as_set() -> None:
    """`letterbox settings set NAME VALUE`: NAME is the stored key, and decode reads back what was set."""
    given = {"dns_resolver": "127.0.0.1:5353", "port25_probe": "mx.example.net:2525", "status_checks": "off",
             "delivery_log": "no", "delivery_log_days": "7", "queue_hold": "ON"}
    assert set(given) == set(SETTABLE)
    for name, text in given.items():
        rows = encode(parse_setting(name, text))
        assert list(rows) == [name]
        values = decode(rows, default_hostname="box.test")
        assert SETTABLE[name].shown(values) == {"no": "off", "ON": "on"}.get(text, text)
    assert parse_setting("dns_resolver", "system") == {"dns_resolver": None}


@pytest.mark.parametrize(("name", "text"), [
    ("hostname", "box.test"), ("dns_resolver", "dns.example"), ("dns_resolver", "[::1]:0"),
    ("port25_probe", ":25"), ("port25_probe", "mx.example.net:0"), ("delivery_log_days", "3651"),
    ("delivery_log", "2"),
])
def test_a_name_or_value_not_taken_is_a_setting_error(name: str, text: str) -> None:
    with pytest.raises(SettingError):
        parse_setting(name, text)
