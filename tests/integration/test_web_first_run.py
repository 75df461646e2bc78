"""The first run over real HTTPS: the wizard's first step needs the one-time setup code, and of many
simultaneous first steps exactly one makes an administrator (issue 11 item 4)."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import ssl
import stat
import threading
import urllib.parse
from collections.abc import Callable

import httpx
import pytest

from appliance.setup_code import code_path
from tests.conftest import BoxHandle
from tests.support.polling import wait_until
from tests.support.web import ADMIN_PASSWORD, HOSTNAME, setup_code
from web.session import SECURE_COOKIE_NAME

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


def _post_late(box: BoxHandle, client: httpx.Client, path: str, content_type: str, body: bytes,
               meanwhile: Callable[[], None]) -> tuple[int, str]:
    """POST with the headers first and the body only after `meanwhile` ran: the routes decide "is there an
    administrator?" when the headers arrive and read the form later. (status, location)."""
    cookies = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    raw = socket.create_connection(("127.0.0.1", box.port("https")), timeout=60)
    with box.client_context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {cookies}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode())
        meanwhile()
        tls.sendall(body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), fields.get("location", "")


def test_a_first_step_overtaken_by_the_first_admin_changes_nothing(box: BoxHandle) -> None:
    """A request to step 1 whose form arrives after someone else became the administrator is theirs no
    more: it must be sent to log in, not be taken as the (logged-in) administrator editing step 1."""
    late, csrf = _prepared_client(box)
    host = "late.example.net"
    body = urllib.parse.urlencode({"csrf": csrf, "name": "late", "password": ADMIN_PASSWORD,
                                   "password2": ADMIN_PASSWORD, "hostname": host, "code": "AAAA-BBBB-CCCC"}).encode()

    def someone_else_finishes_step_1() -> None:
        first, first_csrf = _prepared_client(box)
        try:
            won = _step1(first, first_csrf, "owner", setup_code(box.data.root))
        finally:
            first.close()
        assert (won.status_code, won.headers["location"]) == (303, "/setup/2")

    try:
        answer = _post_late(box, late, "/setup/1", "application/x-www-form-urlencoded", body,
                            someone_else_finishes_step_1)
    finally:
        late.close()
    assert answer == (303, "/login")
    assert box.services.hostname != host
    assert box.run(box.services.accounts.list_admins()) == ["owner"]


def test_a_wizard_restore_overtaken_by_an_administrator_is_refused(box: BoxHandle) -> None:
    """The first screen's restore is for an unclaimed box only: an administrator made while the upload
    arrives (here by the CLI's way, which leaves the setup code file in place) ends it, code or not."""
    client = httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context, timeout=60)
    try:
        page = client.get("/setup/restore")
        m = _CSRF.search(page.text)
        assert m
        fields = {"csrf": m.group(1), "code": setup_code(box.data.root), "secret": "a passphrase"}
        boundary = "letterbox-test-boundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="backup"; filename="b.tar.zst.age"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + b"age" * 1000 + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        answer = _post_late(box, client, "/setup/restore", f"multipart/form-data; boundary={boundary}", body,
                            lambda: box.run(box.services.accounts.add_admin("owner", ADMIN_PASSWORD)))
    finally:
        client.close()
    assert answer == (303, "/login")
    assert box.services.backups.current is None
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]


BOUNDARY = "letterbox-test-boundary"


def _form_head(box: BoxHandle, code: str | None) -> tuple[str, bytes]:
    """The session cookie's header line and the form's first part up to the file's data: with `code`, the
    CSRF token (of a session of its own) and that setup code before the file, as a browser sends the
    wizard's form."""
    fields, cookie = "", ""
    if code is not None:
        with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as client:
            m = _CSRF.search(client.get("/setup/restore").text)
            assert m
            cookie = f"Cookie: {SECURE_COOKIE_NAME}={client.cookies[SECURE_COOKIE_NAME]}\r\n"
        fields = "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                         for name, value in (("csrf", m.group(1)), ("code", code)))
    return cookie, (f"{fields}--{BOUNDARY}\r\n"
                    'Content-Disposition: form-data; name="backup"; filename="b.tar.zst.age"\r\n\r\n').encode()


def _upload_head(box: BoxHandle, length: int, *, chunked: bool = False, code: str | None = None,
                 head: tuple[str, bytes] | None = None) -> ssl.SSLSocket:
    """A wizard restore whose headers (and a first piece of its form, _form_head's) have arrived, its body
    still to come; `chunked`: its body in chunks, which RFC 9112 6.3 reads in place of the Content-Length
    it also has."""
    cookie, first = head or _form_head(box, code)
    raw = socket.create_connection(("127.0.0.1", box.port("https")), timeout=20)
    tls = box.client_context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"POST /setup/restore HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n{cookie}"
                f"{'Transfer-Encoding: chunked' + chr(13) + chr(10) if chunked else ''}"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
                + (b"%x\r\n%s\r\n" % (len(first), first) if chunked else first))
    return tls


def _one_answer(tls: ssl.SSLSocket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        more = tls.recv(65536)
        assert more, f"the box closed the connection without an answer: {data[:200]!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += tls.recv(65536)
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_wizard_uploads_arriving_together_share_the_free_space(box: BoxHandle) -> None:
    """Each upload was checked alone against the free space: on a fresh box, before the setup code (a
    field of the same form) was read, anyone could send several at once, each up to half of it. The
    uploads arriving count now; one gone gives its share back."""
    free = shutil.disk_usage(box.data.root.resolve().parent).free
    length = free * 2 // 5  # one fits (it and its copy: 4/5 of the space), two do not
    httpx.get(f"https://localhost:{box.port('https')}/setup/restore", verify=box.client_context)  # makes the code
    code = setup_code(box.data.root)  # the owner's two tabs
    first = _upload_head(box, length, code=code)
    try:
        wait_until(lambda: box.services.backups.arriving == length, seconds=10, what="the first upload reserved")
        second = _upload_head(box, length, code=code)
        with second:
            answer = _one_answer(second)
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
        assert "beside the uploads arriving now" in answer
    finally:
        first.close()
    wait_until(lambda: box.services.backups.arriving == 0, seconds=10, what="the first upload's share given back")


def test_a_wizard_upload_in_chunks_is_refused_before_its_body(box: BoxHandle) -> None:
    """The room an upload needs was judged by its Content-Length; with Transfer-Encoding: chunked beside
    it the body is read as chunks (RFC 9112 6.3), of any length: a stranger reserved 100 octets and sent
    200 MiB, all of it written beside the data directory before the setup code was looked at. Such an
    upload is refused (411) before any of its body is read."""
    with _upload_head(box, 100, chunked=True) as tls:
        answer = _one_answer(tls)
    assert answer.startswith("HTTP/1.1 411"), answer[:200]
    assert "Content-Length" in answer
    assert box.services.backups.arriving == 0
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]


def test_a_strangers_wizard_upload_is_never_written(box: BoxHandle, caplog: pytest.LogCaptureFixture) -> None:
    """The setup code was looked at once the whole upload had been written beside the data directory:
    anyone could fill half the free space with each upload, and hold that room for as long as the upload
    trickled on (every owner's restore refused meanwhile). The code comes before the file in the form: a
    wrong one gives the room back at once, nothing of the file is written, and the browser still gets
    its answer when the body has come."""
    data, tail = b"age" * 400_000, f"\r\n--{BOUNDARY}--\r\n".encode()
    caplog.set_level(logging.WARNING, logger="letterbox.setup")
    head = _form_head(box, "AAAA-BBBB-CCCC")
    with _upload_head(box, len(head[1]) + len(data) + len(tail), head=head) as tls:
        tls.sendall(data[: len(data) // 2])
        wait_until(lambda: "wrong setup code" in caplog.text, seconds=10, what="the code looked at before the file")
        assert box.services.backups.arriving == 0
        assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]
        tls.sendall(data[len(data) // 2:] + tail)
        answer = _one_answer(tls)
    assert answer.startswith("HTTP/1.1 303"), answer[:200]
    assert "location: /setup/restore" in answer.lower()
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]
    assert box.services.backups.current is None


def test_an_upload_cut_off_midway_leaves_nothing_and_no_traceback(box: BoxHandle,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The owner's restore upload (the right setup code) whose connection is lost halfway: the part
    written beside the data directory is removed and its room given back, and the log says so in one
    line; it held a 60-line traceback at ERROR ('Exception in ASGI application', ClientDisconnect), which
    anyone could repeat without the code through any upload or autodiscover request."""
    caplog.set_level(logging.INFO)
    httpx.get(f"https://localhost:{box.port('https')}/setup/restore", verify=box.client_context)  # makes the code
    head = _form_head(box, setup_code(box.data.root))
    with _upload_head(box, len(head[1]) + 4 * 2**20, head=head) as tls:
        tls.sendall(b"age" * 500_000)
        wait_until(lambda: [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name], seconds=10,
                   what="the upload being written")
    wait_until(lambda: "the client went away during POST /setup/restore" in caplog.text, seconds=10,
               what="the lost connection noticed")
    assert not [p for p in box.data.root.parent.iterdir() if ".upload-" in p.name]
    assert box.services.backups.arriving == 0
    assert box.services.backups.current is None
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
