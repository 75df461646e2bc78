"""The box started by letterbox-update puts the update's outcome into its events itself, as soon as
letterbox-update writes it (appliance/update_outcome.py): no `letterbox update status` process (4-7 s of
an emulated guest's CPU), no wait for someone to open the console's Updates page."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import trustme

from appliance import update
from appliance.admin import Admin
from tests.conftest import BoxHandle


def _write(data: Path, **status: object) -> None:
    folder = data / "updates"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / "status.json").write_text(json.dumps({"at": 1_800_000_000, **status}), encoding="utf-8")


def _update_events(box: BoxHandle) -> list[str]:
    return [text for _, kind, text in box.run(box.services.events.recent(50)) if kind == "update"]


def test_the_outcome_written_after_the_start_becomes_an_event_at_once(tmp_path: Path, ca: trustme.CA) -> None:
    data = tmp_path / "data"
    # letterbox-update starts the new version while the state is still "running", and writes "done"
    # only once that version answers.
    _write(data, state="running", version="99.0.0", previous="1.0.0", message="installing")
    box = BoxHandle(data, ca)
    try:
        time.sleep(1.2)  # the box looks a few times: nothing to record yet
        assert _update_events(box) == []
        _write(data, state="done", version="99.0.0", previous="1.0.0", message="updated from 1.0.0 to 99.0.0")
        deadline = time.monotonic() + 5
        while not (update.read_status(data) or {}).get("recorded") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (update.read_status(data) or {}).get("recorded") is True  # what letterbox-update waits for
        assert _update_events(box) == ["updated from 1.0.0 to 99.0.0"]
    finally:
        box.close()


def test_no_update_in_flight_nothing_is_followed(tmp_path: Path, ca: trustme.CA) -> None:
    data = tmp_path / "data"
    _write(data, state="done", version="99.0.0", previous="1.0.0", message="updated", recorded=True)
    box = BoxHandle(data, ca)
    try:
        assert not [t for t in box.run(_tasks()) if t == "update-outcome"]
    finally:
        box.close()


async def _tasks() -> list[str]:
    return [task.get_name() for task in asyncio.all_tasks()]


def test_the_follower_and_the_updates_page_at_once_record_it_once(tmp_path: Path, ca: trustme.CA) -> None:
    """Each read status.json before the other marked it recorded: the outcome became two events."""
    data = tmp_path / "data"
    box = BoxHandle(data, ca)
    try:
        _write(data, state="done", version="99.0.0", previous="1.0.0", message="updated from 1.0.0 to 99.0.0")

        async def both() -> None:
            await asyncio.gather(*(Admin.of(box.services).record_update_outcome() for _ in range(2)))

        box.run(both())
        assert _update_events(box) == ["updated from 1.0.0 to 99.0.0"]
    finally:
        box.close()
