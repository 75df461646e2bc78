"""The wizard's progress, kept in the settings so a reload (or a restart) resumes where it stopped."""

from __future__ import annotations

from appliance.db import Database
from web.wizard import FIRST_STEP, LAST_STEP

SETUP_STEP = "setup_step"  # the furthest step reached
SETUP_DONE = "setup_done"  # "1" once the last step was shown
SETUP_DOMAIN = "setup_domain"  # the domain chosen in step 2
SETUP_DOMAIN_ADDED = "setup_domain_added"  # "1" when step 2 created it (then a later step 2 may replace it)


async def setup_step(db: Database) -> int:
    try:
        step = int(await db.get_setting(SETUP_STEP) or FIRST_STEP)
    except ValueError:
        step = FIRST_STEP
    return min(max(step, FIRST_STEP), LAST_STEP)


async def reach(db: Database, step: int) -> None:
    if step > await setup_step(db):
        await db.set_setting(SETUP_STEP, str(step))


async def setup_done(db: Database) -> bool:
    return await db.get_setting(SETUP_DONE) == "1"
