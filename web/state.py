"""The wizard's progress, kept in the settings so a reload (or a restart) resumes where it stopped."""

from __future__ import annotations

from appliance.settings import Settings
from web.wizard import FIRST_STEP, LAST_STEP


async def setup_step(settings: Settings) -> int:
    step = (await settings.fresh()).setup_step or FIRST_STEP
    return min(max(step, FIRST_STEP), LAST_STEP)


async def reach(settings: Settings, step: int) -> None:
    if step > await setup_step(settings):
        await settings.save(setup_step=step)


async def setup_done(settings: Settings) -> bool:
    return (await settings.fresh()).setup_done
