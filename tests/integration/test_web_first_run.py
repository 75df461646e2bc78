"""The first run over real HTTPS: the wizard's first step needs the one-time setup code, and of many
simultaneous first steps exactly one makes an administrator (issue 11 item 4)."""

from __future__ import annotations

import re
import stat
import threading

import httpx
import pytest

from appliance.setup_code import code_path
from tests.conftest import BoxHandle
from tests.support.web import ADMIN_PASSWORD, HOSTNAME, setup_code

RACERS = 12
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _prepared_client(box: BoxHandle) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context, timeout=180)
    page = client.get("/setup/1")
    m = _CSRF.search(page.text)
    assert page.status_code == 200
    assert m
    return client, m.group(1)


def _step1(client: httpx.Client, csrf: str, name: str, code: str | None) -> httpx.Response:
    form = {"csrf": csrf, "name": name, "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD,
            "hostname": HOSTNAME}
    if code is not None:
        form["code"] = code
    return client.post("/setup/1", data=form)


def test_simultaneous_first_steps_make_exactly_one_admin(box: BoxHandle) -> None:
    clients = [_prepared_client(box) for _ in range(RACERS)]
    code = setup_code(box.data.root)
    start = threading.Barrier(RACERS)
    answers: list[httpx.Response | BaseException] = [ValueError("not run")] * RACERS

    def race(i: int) -> None:
        client, csrf = clients[i]
        start.wait(timeout=30)
        try:
            answers[i] = _step1(client, csrf, f"admin{i}", code)
        except BaseException as exc:  # noqa: BLE001  reported below, with the others
            answers[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    for client, _ in clients:
        client.close()
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    assert len(responses) == RACERS, [repr(a) for a in answers if not isinstance(a, httpx.Response)]
    admins = box.run(box.services.accounts.list_admins())
    assert len(admins) == 1, admins
    winners = [r for r in responses if r.status_code == 303 and r.headers["location"] == "/setup/2"]
    assert len(winners) == 1
    # The others are sent to the login page: the box has its administrator now.
    assert all((r.status_code, r.headers.get("location")) == (303, "/login") for r in responses if r is not winners[0])
    assert not code_path(box.data.root).exists()  # used up


@pytest.mark.parametrize("code", [None, "", "AAAA-BBBB-CCCC"])
def test_first_step_without_the_right_code_is_refused(box: BoxHandle, code: str | None) -> None:
    client, csrf = _prepared_client(box)
    try:
        response = _step1(client, csrf, "intruder", code)
        assert response.status_code == 400
        assert 'id="e-code"' in response.text
        assert not box.run(box.services.accounts.has_admin())
        path = code_path(box.data.root)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # The right code still works afterwards (one wrong try does not burn it).
        right = _step1(client, csrf, "owner", setup_code(box.data.root))
        assert right.status_code == 303
        assert right.headers["location"] == "/setup/2"
    finally:
        client.close()
    assert box.run(box.services.accounts.list_admins()) == ["owner"]


def test_serve_prints_the_code_until_an_admin_exists(box: BoxHandle) -> None:
    from appliance.app import announce_setup_code

    lines: list[str] = []
    box.run(announce_setup_code(box.services, lines.append))
    code = setup_code(box.data.root)
    assert len(lines) == 1
    assert f"First-run setup code: {code}" in lines[0]
    assert stat.S_IMODE(code_path(box.data.root).stat().st_mode) == 0o600
    box.run(announce_setup_code(box.services, lines.append))  # a restart keeps the same code
    assert f"First-run setup code: {code}" in lines[1]
    box.run(box.services.accounts.add_admin("admin", ADMIN_PASSWORD))  # e.g. made another way
    box.run(announce_setup_code(box.services, lines.append))
    assert len(lines) == 2
    assert not code_path(box.data.root).exists()
