"""The wizard over the box's own HTTPS listener, as browsers reach it: what a page shows to whom, and
that loading a page changes nothing.

The last step's GET marked setup as done: a link or an image on another site, loaded in the
administrator's browser, ended the wizard behind their back. It is a POST with the session's CSRF token
now (step 6's Continue, or the last page's button). While a restore started from the wizard's first
screen ran, its progress and result line (the backup's host name, how many files) were shown to anyone
who opened the wizard; only the browser session that started it (and so gave the setup code) sees them
now, any other visitor only that a restore runs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.support.other_box import other_box_backup, wizard_restore

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


def test_a_wizard_restore_is_shown_only_to_the_browser_that_started_it(box: BoxHandle, tmp_path: Path) -> None:
    file, kit = other_box_backup(tmp_path, "other")
    base = f"https://localhost:{box.port('https')}"
    with httpx.Client(base_url=base, verify=box.client_context, timeout=60) as owner, \
            httpx.Client(base_url=base, verify=box.client_context, timeout=60) as stranger:
        stranger.get("/setup/restore")  # a session of its own, before and after the restore started
        job = wizard_restore(owner, box.data.root, file, kit, seconds=120)
        assert job["result"].startswith("Verified "), job
        host = job["result"].split(" from ", 1)[1].split(" (", 1)[0]
        assert host
        assert host in owner.get("/setup/restore").text

        seen = stranger.get("/setup/restore/progress").json()["job"]
        assert seen == {"kind": "restore", "running": False, "percent": 0, "done": 0, "total": 0, "stage": "",
                        "result": "", "error": ""}
        shown = stranger.get("/setup/restore").text
        assert 'id="restore-elsewhere"' in shown
        assert "Verified" not in shown
        assert host not in shown
        assert 'name="code"' not in shown  # no second restore offered meanwhile
        with httpx.Client(base_url=base, verify=box.client_context) as fresh:  # no session at all
            assert fresh.get("/setup/restore/progress").json()["job"]["result"] == ""
            assert "Verified" not in fresh.get("/setup/restore").text
