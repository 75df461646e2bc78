"""The status checklist's "Content filter" item (issue 18) against a real rspamd + Redis
(tests/support/rspamd.py): green while rspamd answers, red with the fix once it is stopped (and on the
wizard's last page as a thing left to do), amber when the admin switched filtering off."""

from __future__ import annotations

import contextlib
import html
from pathlib import Path

import httpx

from appliance import status_checks
from appliance.status_checks import Probes
from tests.conftest import BoxHandle, require_program
from tests.integration.test_live_settings import admin_console
from tests.integration.test_status_checks import closed_port, run
from tests.support.rspamd import running_rspamd
from tests.support.spam_settings import set_spam, use_rspamd


def done_page(web: httpx.Client) -> str:
    """The wizard's last step as the admin sees it."""
    page = web.get("/setup/7")
    assert page.status_code == 200, page.text[:300]
    return page.text


def test_content_filter_up_down_and_off(box: BoxHandle, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        up_down_and_off(box, tmp_path, stack)


def up_down_and_off(box: BoxHandle, tmp_path: Path, stack: contextlib.ExitStack) -> None:
    require_program("rspamd")
    require_program("redis-server")
    web = stack.enter_context(admin_console(box))
    box.run(box.services.db.set_setting("setup_step", "7"))
    with running_rspamd(tmp_path / "rspamd") as rspamd:
        use_rspamd(box, rspamd.scanner, rspamd.controller)
        item = run(box)["content_filter"]
        assert (item.level, item.title) == ("ok", "Content filter")
        assert item.summary == f"rspamd at {rspamd.scanner} answers, 0 messages scanned."
        assert 'id="todo-content-filter"' not in done_page(web)
    # rspamd stopped (both processes gone): red, with what to do, and where.
    item = run(box)["content_filter"]
    assert item.level == "fail"
    assert "does not answer" in item.summary
    assert "Mail is delivered unchecked" in item.summary
    assert "nothing is lost" in item.summary
    # rspamd is installed here (the test ran one): start it, give it time, or turn spam checking off.
    assert "rspamd is installed here. Just after the box started" in item.fix
    assert "sudo systemctl restart redis-server rspamd" in item.fix
    assert "switch the content filter off in the spam settings" in item.fix
    assert item.link == "/console/spam"
    page = done_page(web)
    assert 'id="todo-content-filter"' in page
    todo = page.split('id="todo-content-filter"')[1].split("</li>")[0]
    assert "does not answer" in todo
    assert 'href="/console/spam"' in todo
    # Switched off on purpose: amber on the checklist (the fix says how to turn it on), no to-do.
    set_spam(box, content_filter=False)
    item = run(box)["content_filter"]
    assert item.level == "warn"
    assert "switched off" in item.summary
    assert "Turn the content filter on" in item.fix
    assert 'id="todo-content-filter"' not in done_page(web)


def test_the_console_home_shows_the_content_filter_problem(box: BoxHandle) -> None:
    """A box without rspamd at all (a checkout's `make run`): red, and told to install it, not to
    restart a service it does not have; the Spam page says the same."""
    port = closed_port()  # the filter is on and nothing answers at rspamd's address
    use_rspamd(box, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}")
    box.services.status_probes = Probes(port25_target=lambda: f"127.0.0.1:{closed_port()}",
                                        clock_synchronised=lambda: True, installed=lambda name: False)
    with admin_console(box) as web:
        box.run(status_checks.run_all(box.services))
        page = web.get("/console").text
        spam = web.get("/console/spam").text
    item = html.unescape(page.split('id="check-content_filter"')[1].split("</li>")[0])
    assert 'class="badge wrong">problem' in item
    assert f"rspamd at http://127.0.0.1:{port} does not answer" in item
    assert "Mail is delivered unchecked: it all goes to the inboxes, none to Junk" in item
    assert "rspamd, the program that checks mail for spam, is not installed on this computer" in item
    assert "sudo apt install rspamd redis-server" in item
    assert "systemctl" not in item
    assert 'href="/console/spam">Fix it' in item
    assert "is not installed on this computer" in html.unescape(spam.split('id="content-filter"')[1].split("</section>")[0])
