"""appliance/time_zone.py: the names offered, the system's zone, and times shown with their zone."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from appliance import time_zone


def test_shown_with_the_zone_and_daylight_saving() -> None:
    winter = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()
    summer = dt.datetime(2026, 7, 15, 12, 0, tzinfo=dt.UTC).timestamp()
    assert time_zone.shown(winter, "Europe/Berlin") == "2026-01-15 13:00 CET"
    assert time_zone.shown(summer, "Europe/Berlin", seconds=True) == "2026-07-15 14:00:00 CEST"
    assert time_zone.shown(dt.datetime(2026, 1, 15, 12, 0), "America/New_York") == "2026-01-15 07:00 EST"


def test_an_unknown_stored_name_falls_back_to_the_system_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert time_zone.system_zone() == "Asia/Tokyo"
    assert time_zone.zone("") == zoneinfo.ZoneInfo("Asia/Tokyo")
    monkeypatch.setenv("TZ", "Nowhere/Land")
    assert time_zone.system_zone() in time_zone.available() or time_zone.system_zone() == "UTC"


@pytest.mark.parametrize(("text", "ok"), [
    ("Europe/Berlin", True), (" America/New_York ", True), ("UTC", True),
    ("Mars/Olympus", False), ("", False), ("../../etc/passwd", False), ("x" * 500, False),
])
def test_check(text: str, ok: bool) -> None:
    name, problem = time_zone.check(text)
    assert (name is not None, problem is None) == (ok, ok)


def test_the_list_is_sorted_and_without_legacy_aliases() -> None:
    names = time_zone.available()
    assert list(names) == sorted(names)
    assert "Europe/Berlin" in names
    assert not any(name.startswith(("posix/", "right/")) for name in names)
