"""Content-filter settings for a test box pointed at a private rspamd (tests/support/rspamd.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.conftest import BoxHandle


def use_rspamd(box: BoxHandle, scanner: str, controller: str, **spam: Any) -> None:
    """Switch the box's content filter on, at `scanner`/`controller`; `spam` overrides other
    SpamSettings fields (junk_score, reject_score, ...)."""
    async def save() -> None:
        now = await box.services.settings.fresh()
        await box.services.settings.save(spam=dataclasses.replace(
            now.spam, content_filter=True, rspamd_url=scanner, rspamd_controller_url=controller, **spam))

    box.run(save())


def set_spam(box: BoxHandle, **spam: Any) -> None:
    """Change SpamSettings fields of a running test box."""
    async def save() -> None:
        now = await box.services.settings.fresh()
        await box.services.settings.save(spam=dataclasses.replace(now.spam, **spam))

    box.run(save())
