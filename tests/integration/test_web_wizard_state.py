"""The wizard over the box's own HTTPS listener, as browsers reach it: loading a page changes nothing.

The last step's GET marked setup as done: a link or an image on another site, loaded in the
administrator's browser, ended the wizard behind their back. It is a POST with the session's CSRF token
now (step 6's Continue, or the last page's button)."""

from __future__ import annotations

import re

from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _done(box: BoxHandle) -> bool:
    return box.run(box.services.settings.fresh()).setup_done


def test_loading_the_last_step_does_not_finish_the_wizard(box: BoxHandle) -> None:
    with admin_console(box) as web:
        box.run(box.services.db.set_setting("setup_step", "7"))  # reached, not finished
        page = web.get("/setup/7")
        assert page.status_code == 200, page.text[:300]
        assert not _done(box)
        assert web.get("/setup").headers["location"] == "/setup/7"  # still the wizard, not the console
        token = _CSRF.search(page.text)
        assert token
        for forged in ({}, {"csrf": ""}, {"csrf": "forged-token-" + "x" * 40}):
            refused = web.post("/setup/7", data=forged)
            assert refused.status_code == 403, (forged, refused.status_code)
            assert not _done(box)
        finished = web.post("/setup/7", data={"csrf": token.group(1)})
        assert (finished.status_code, finished.headers["location"]) == (303, "/console")
        assert _done(box)
        events = [text for _, _, text in box.run(box.services.events.recent())]
        assert events.count("first-run setup finished") == 1
