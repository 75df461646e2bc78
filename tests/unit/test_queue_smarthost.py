"""The relay (smarthost) setting: validation, defaults, and a password that never shows (issue 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.db import Database
from appliance.queue.smarthost import Smarthost, SmarthostError
from appliance.settings import Settings, read_settings


@pytest.mark.parametrize("kwargs", [
    {"host": "", "port": 587},
    {"host": "smtp provider", "port": 587},
    {"host": "smtp.provider.test", "port": 0},
    {"host": "smtp.provider.test", "port": 587, "tls": "none"},
    {"host": "smtp.provider.test", "port": 587, "user": "me"},  # a user without a password
])
def test_invalid_relays_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(SmarthostError):
        Smarthost(**kwargs)  # type: ignore[arg-type]


def test_the_password_is_never_shown() -> None:
    relay = Smarthost("smtp.provider.test", 465, "implicit", "me@provider.test", "hunter2-long")
    assert "hunter2" not in repr(relay)
    assert "hunter2" not in relay.describe()
    assert relay.describe() == "smtp.provider.test:465 (implicit) as me@provider.test"
    assert relay.login is not None
    assert "hunter2" not in repr(relay.login)
    assert Smarthost("relay.isp.test", 587).login is None


def test_stored_and_loaded_with_default_ports(tmp_path: Path) -> None:
    async def run() -> list[Smarthost | None]:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            settings = await Settings.load(db, default_hostname="box.test")
            found = [settings.now.relay]
            await settings.save(relay=Smarthost("smtp.provider.test", 2525, "starttls", "me", "pw"))
            found.append(settings.now.relay)
            await db.set_setting("smarthost_port", "")
            await db.set_setting("smarthost_tls", "implicit")
            found.append((await settings.fresh()).relay)
            await settings.save(relay=None)
            found.append((await read_settings(db)).relay)
            return found
        finally:
            await db.close()

    none, stored, defaulted, cleared = asyncio.run(run())
    assert none is None
    assert cleared is None
    assert stored == Smarthost("smtp.provider.test", 2525, "starttls", "me", "pw")
    assert defaulted is not None
    assert defaulted.port == 465
