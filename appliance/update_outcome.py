"""An update's outcome put into the box's events by the box itself, as soon as letterbox-update writes it.

letterbox-update (root, appliance/update.py) starts the new version, waits until it answers, and only then
writes DATA/updates/status.json `done` (or, rolled back, starts the old version again and writes `failed`).
The box it started finds the state `running` at start and looks at that small file every POLL seconds
until the outcome is there; Admin.record_update_outcome makes it an event and marks it recorded, which
letterbox-update waits for. Before, letterbox-update ran `letterbox update status` for this: a second
Python process whose imports cost 4-7 s of CPU in an emulated guest (a Pi's seconds too)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from appliance.admin import Admin
from appliance.services import Services

log = logging.getLogger(__name__)

POLL = 0.5
# Longer than letterbox-update waits for a start (900 s by default) and rolls back: then it is gone anyway.
FOLLOW_FOR = 3600.0


class UpdateFollower:
    """The background service (app.BACKGROUND): a task only while an update is in flight at start."""

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self._task = task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _in_flight(root: Path) -> bool:
    from appliance import update

    status = update.read_status(root)
    return status is not None and status.get("state") == "running"


async def start_update_follower(services: Services) -> UpdateFollower:
    root = services.config.data.root
    if not await asyncio.to_thread(_in_flight, root):
        return UpdateFollower(None)
    return UpdateFollower(asyncio.create_task(_follow(Admin.of(services), root), name="update-outcome"))


async def _follow(admin: Admin, root: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FOLLOW_FOR
    while await asyncio.to_thread(_in_flight, root):
        if loop.time() > deadline:
            return
        await asyncio.sleep(POLL)
    try:
        await admin.record_update_outcome()
    except Exception:  # the console's Updates page or the next start records it
        log.exception("the update's outcome could not be recorded")
