"""The web listeners in the running box: uvicorn on the box's loop, HTTPS with the box's certificate,
HTTP redirecting to HTTPS except for what clients fetch over plain HTTP."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time

import httpx
import pytest

from appliance import web_server
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.integration.test_pop3_mail import loop_gaps
from tests.unit.test_web_autoconfig import OUTLOOK_REQUEST


def test_https_serves_the_console_with_the_boxs_certificate(box: BoxHandle) -> None:
    port = box.port("https")
    response = httpx.get(f"https://localhost:{port}/", verify=box.client_context)
    assert response.status_code == 303
    assert response.headers["location"] == "/setup"
    page = httpx.get(f"https://localhost:{port}/setup/1", verify=box.client_context)
    assert page.status_code == 200
    assert "Welcome to Letterbox" in page.text
    assert "Secure" in page.headers["set-cookie"]
    assert "server" not in page.headers  # no software banner
    with pytest.raises(httpx.ConnectError):  # not trusted without the box's CA
        httpx.get(f"https://localhost:{port}/", verify=ssl.create_default_context())


def test_http_redirects_to_https(box: BoxHandle) -> None:
    http, https = box.port("http"), box.port("https")
    response = httpx.get(f"http://localhost:{http}/console/mailboxes?x=1&y=2")
    assert response.status_code == 301
    assert response.headers["location"] == f"https://localhost:{https}/console/mailboxes?x=1&y=2"
    # A Host header that is not a plain name never makes it into the Location header.
    with socket.create_connection(("127.0.0.1", http), timeout=5) as raw:
        raw.sendall(b"GET /x HTTP/1.1\r\nHost: evil.example/@other\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 301")
    assert f"location: https://{box.services.hostname}:{https}/x".encode() in reply.lower()


def test_the_redirect_to_https_is_always_a_well_formed_url(box: BoxHandle) -> None:
    """A bracketed Host went into the Location header unchecked ('[/@evil.example' gave
    'https://[/@evil.example]:...'), and a request target that is no path (absolute-form, '*', CONNECT's
    authority) was glued to the port: 'https://mail.example.test:443http%3A//evil.example/x'."""
    http, https = box.port("http"), box.port("https")
    cases = [
        ("GET /x HTTP/1.1", "[::1]", f"https://[::1]:{https}/x"),
        ("GET /x HTTP/1.1", f"[::1]:{http}", f"https://[::1]:{https}/x"),
        ("GET /x HTTP/1.1", "[/@evil.example", f"https://{box.services.hostname}:{https}/x"),
        ("GET /x HTTP/1.1", "[evil.example]", f"https://{box.services.hostname}:{https}/x"),
        ("GET /x HTTP/1.1", "[fe80::1%@evil.example]", f"https://{box.services.hostname}:{https}/x"),
    ]
    for line, host, location in cases:
        reply = _plain_request(http, f"{line}\r\nHost: {host}")
        assert reply.startswith(b"HTTP/1.1 301"), (host, reply[:200])
        assert f"\r\nlocation: {location}\r\n".encode() in reply.lower(), (host, reply[:300])
    for line in ("GET http://evil.example/x HTTP/1.1", "GET * HTTP/1.1", "OPTIONS * HTTP/1.1",
                 "CONNECT evil.example:443 HTTP/1.1"):
        reply = _plain_request(http, f"{line}\r\nHost: mail.example.test")
        assert reply.startswith(b"HTTP/1.1 400"), (line, reply[:200])
        assert b"location:" not in reply.lower(), (line, reply[:300])


def _plain_request(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(f"{head}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    return reply


def _plain_get(port: int, path: str, host: str) -> bytes:
    return _plain_request(port, f"GET {path} HTTP/1.1\r\nHost: {host}")


def test_a_rebound_name_reaches_no_page_of_the_wizard(box: BoxHandle) -> None:
    """DNS rebinding against a box not yet set up: a page of evil.example has its name resolve to the
    box's address, so that its script may read and post the box's pages as its own. Over plain HTTP the
    box answers only with the redirect to HTTPS and with what mail programs and the ACME CA fetch, whatever
    the path's dot segments; over HTTPS its certificate does not name evil.example, so the browser drops
    the connection before a request is sent (the box's own CA trusted here, as the owner's browser is)."""
    http = box.port("http")
    for path in ("/", "/setup/1", "/setup/restore", "/login", "/console", "/.well-known/../setup/1",
                 "/.well-known/%2e%2e/setup/1", "/mail/config-v1.1.xml/../../setup/1"):
        reply = _plain_get(http, path, f"evil.example:{http}")
        assert reply.startswith((b"HTTP/1.1 301", b"HTTP/1.1 404")), (path, reply[:200])
        assert b"csrf" not in reply, path
        assert b"<form" not in reply, path
    https = box.port("https")
    for name in ("evil.example", "rebind.evil.example"):
        with socket.create_connection(("127.0.0.1", https), timeout=5) as raw, \
                pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            box.client_context.wrap_socket(raw, server_hostname=name)
    with socket.create_connection(("127.0.0.1", https), timeout=5) as raw, \
            box.client_context.wrap_socket(raw, server_hostname="mail.example.test") as tls:
        tls.sendall(b"GET /setup/1 HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")  # the box's own name: the wizard


def test_thunderbird_autoconfig_over_plain_http(box: BoxHandle) -> None:
    box.add_user("alice@example.test", "alice's long password")
    http = box.port("http")
    for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
        response = httpx.get(f"http://localhost:{http}{path}?emailaddress=alice@example.test")
        assert response.status_code == 200, path
        assert f"<port>{box.port('imaps')}</port>" in response.text  # the port actually bound
    assert httpx.get(f"http://localhost:{http}/.well-known/nothing-here").status_code == 404


AUTODISCOVER_CASINGS = ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml",
                        "/AutoDiscover/AutoDiscover.xml", "/AUTODISCOVER/AUTODISCOVER.XML", "/autoDiscover/Autodiscover.Xml")


def test_outlook_autodiscover_in_any_letter_case(box: BoxHandle) -> None:
    """Outlook posts to /AutoDiscover/AutoDiscover.xml too (IIS matches paths in any case): every casing
    is answered, before the wizard made an admin and after; other paths keep their one spelling."""
    box.add_user("alice@example.test", "alice's long password")
    base = f"https://localhost:{box.port('https')}"
    body = OUTLOOK_REQUEST.format(address="alice@example.test").encode()

    def answers(web: httpx.Client) -> None:
        for path in AUTODISCOVER_CASINGS:
            response = web.post(f"{base}{path}", content=body, headers={"content-type": "text/xml"})
            assert response.status_code == 200, (path, response.status_code, response.text[:200])
            assert "<Server>mail.example.test</Server>" in response.text, path
            assert web.get(f"{base}{path}").status_code == 405, path  # POST only, in any case

    with httpx.Client(verify=box.client_context) as first_run:
        answers(first_run)  # no admin yet: open, as the wizard's own pages are
        for path in ("/MAIL/config-v1.1.xml?emailaddress=alice@example.test", "/Setup/1", "/AutoDiscoverX"):
            response = first_run.get(f"{base}{path}")
            assert (response.status_code, response.headers.get("location")) == (303, "/setup"), path
    with admin_console(box, "mail.example.test") as console:
        answers(console)
        for path in ("/MAIL/config-v1.1.xml?emailaddress=alice@example.test", "/Console", "/autodiscover/other.xml"):
            assert console.get(path).status_code == 404, path


def test_listener_status_for_the_console(box: BoxHandle) -> None:
    status = box.services.listeners()
    assert status["https"] == ("127.0.0.1", box.port("https"), True)
    assert status["http"][2] is True


def test_a_taken_port_fails_at_once(box: BoxHandle) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            box.run(web_server.serve(box.services, "https", "127.0.0.1", port))


def test_close_stops_serving(box: BoxHandle) -> None:
    async def start_and_stop() -> tuple[bool, bool, int]:
        listener = await web_server.serve(box.services, "https", "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        serving = listener.is_serving()
        listener.close()
        await asyncio.wait_for(listener.wait_closed(), 5)
        return serving, listener.is_serving(), port

    serving, after, port = box.run(start_and_stop())
    assert (serving, after) == (True, False)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://localhost:{port}/", verify=box.client_context, timeout=2)


def test_unknown_service_is_refused(box: BoxHandle) -> None:
    with pytest.raises(ValueError):
        box.run(web_server.serve(box.services, "imap", "127.0.0.1", 0))


def _half_requests(port: int, count: int, source: str = "127.0.0.1", sent: bytes = b"GET / HTTP/1.1\r\n") -> list[socket.socket]:
    """Connections that each sent half a request line (a slowloris client's), or what `sent` says."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        sock.sendall(sent)
        socks.append(sock)
    return socks


def _closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset


def test_a_request_head_that_never_ends_is_cut_off(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection must send a whole request head within REQUEST_HEAD_SECONDS: uvicorn itself times
    nothing before that, and 200 such connections held every slot of the console (503 for all)."""
    monkeypatch.setattr(web_server, "REQUEST_HEAD_SECONDS", 1.0)
    [sock] = _half_requests(box.port("http"), 1)
    try:
        assert _closed(sock, 10)
    finally:
        sock.close()
    response = httpx.get(f"http://localhost:{box.port('http')}/x")  # a whole request is answered
    assert response.status_code == 301


def _posting(box: BoxHandle, length: int) -> ssl.SSLSocket:
    """A TLS connection that sent a form POST's whole head, announcing `length` octets of body."""
    raw = socket.create_connection(("127.0.0.1", box.port("https")), timeout=5)
    sock = box.client_context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"POST /setup/1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: %d\r\n\r\n" % length)
    return sock


def test_a_request_body_that_trickles_is_cut_off_and_one_that_flows_is_answered(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a request's head was in, nothing timed its body: a client sending a byte every 2 s held its
    slot as long as its Content-Length allowed (a 256 KiB form: 6 days), and 200 such every slot. The
    body now gets the head's time plus a second per BODY_MIN_RATE octets (Apache's mod_reqtimeout)."""
    monkeypatch.setattr(web_server, "REQUEST_HEAD_SECONDS", 1.0)
    with _posting(box, 100_000) as slow:
        slow.settimeout(0.25)
        started = time.monotonic()
        answer = b"open"
        while time.monotonic() - started < 15:
            try:
                slow.sendall(b"a")
                answer = slow.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:  # reset
                answer = b""
                break
        assert answer == b"", answer  # closed without an answer
        assert time.monotonic() - started < 5
    with _posting(box, 12_000) as steady:  # 4,000 octets a second for 3 s, past the head's second
        for _ in range(6):
            steady.sendall(b"a" * 2_000)
            time.sleep(0.5)
        assert steady.recv(4096).startswith(b"HTTP/1.1 ")


def test_a_request_with_both_content_length_and_chunked_is_the_last_on_its_connection(box: BoxHandle) -> None:
    """RFC 9112 6.1: such a request is read as chunked and the connection closed after the answer. It
    stayed open, and the octets after the chunked body (inside the Content-Length a proxy in front
    would have read) were answered as a second request: the smuggling pattern."""
    with socket.create_connection(("127.0.0.1", box.port("https")), timeout=5) as raw, \
            box.client_context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"POST /setup/1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                     b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 ")
    assert answer.count(b"HTTP/1.1 ") == 1, answer


def test_a_pipelined_request_with_both_content_length_and_chunked_is_the_last_too(box: BoxHandle) -> None:
    """The same request pipelined behind another in one write: uvicorn reads it when the first answer
    is complete, not when data arrives, and the connection stayed open for the smuggled request."""
    with socket.create_connection(("127.0.0.1", box.port("https")), timeout=5) as raw, \
            box.client_context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"GET /setup/1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"POST /setup/1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                     b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == 2, re.findall(rb"HTTP/1\.1 \d{3} |/smuggled", answer)


def test_one_client_holds_a_few_connections_and_others_are_served(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS_PER_CLIENT", 5)
    held = _half_requests(box.port("http"), 8)
    try:
        assert [_closed(sock, 2) for sock in held[5:]] == [True] * 3  # beyond the client's share
        assert not any(_closed(sock, 0.1) for sock in held[:5])
        with socket.create_connection(("127.0.0.1", box.port("http")), timeout=5, source_address=("127.0.0.2", 0)) as other:
            other.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert other.recv(4096).startswith(b"HTTP/1.1 301")
    finally:
        for sock in held:
            sock.close()


def test_a_tls_handshake_that_never_starts_is_cut_off(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's own handshake held a connection that never sent a ClientHello for 60 s, before the
    protocol (its deadline and its cap) was told of it: enough of them took every descriptor of the box."""
    monkeypatch.setattr(web_server, "TLS_HANDSHAKE_SECONDS", 1.0)
    [sock] = _half_requests(box.port("https"), 1, sent=b"")
    try:
        assert _closed(sock, 10)
    finally:
        sock.close()
    response = httpx.get(f"https://localhost:{box.port('https')}/", verify=box.client_context)
    assert response.status_code == 303


def test_handshakes_in_progress_count_in_a_clients_share(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS_PER_CLIENT", 5)
    held = _half_requests(box.port("https"), 8, sent=b"")
    try:
        assert [_closed(sock, 2) for sock in held[5:]] == [True] * 3  # beyond the client's share
        assert not any(_closed(sock, 0.1) for sock in held[:5])
        with socket.create_connection(("127.0.0.1", box.port("https")), timeout=5, source_address=("127.0.0.2", 0)) as raw, \
                box.client_context.wrap_socket(raw, server_hostname="localhost") as other:
            other.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert other.recv(4096).startswith(b"HTTP/1.1 303")
    finally:
        for sock in held:
            sock.close()


def test_a_request_sent_with_the_handshakes_last_flight_is_answered(box: BoxHandle) -> None:
    """A client may send its request in the same segment as its Finished: the TLS layer hands it on
    before start_tls has returned to the protocol, which must keep it rather than drop or misread it."""
    tls = box.client_context.wrap_bio(incoming := ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                      server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", box.port("https")), timeout=5) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())  # Finished and the request together
        answer = b""
        while not answer.startswith(b"HTTP/1.1 303"):
            try:
                answer += tls.read(4096)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, answer
                incoming.write(data)


@pytest.mark.parametrize("service", ["http", "https"])
def test_one_network_holds_a_few_connections_and_other_networks_are_served(
        box: BoxHandle, monkeypatch: pytest.MonkeyPatch, service: str) -> None:
    """An attacker with a /24 (seven addresses of 32 connections each) held every slot of the console;
    one network now holds MAX_CONNECTIONS_PER_NETWORK, counted as the mail ports count it."""
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS_PER_NETWORK", 6)
    sent = b"GET / HTTP/1.1\r\n" if service == "http" else b""
    held = [sock for n in range(4) for sock in _half_requests(box.port(service), 2, f"127.0.0.{20 + n}", sent=sent)]
    try:
        assert [_closed(sock, 2) for sock in held[6:]] == [True] * 2  # beyond the network's share
        assert not any(_closed(sock, 0.1) for sock in held[:6])
        with socket.create_connection(("127.0.0.1", box.port(service)), timeout=5,
                                      source_address=("127.0.1.2", 0)) as raw:
            if service == "http":
                raw.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert raw.recv(4096).startswith(b"HTTP/1.1 301")
            else:
                with box.client_context.wrap_socket(raw, server_hostname="localhost") as other:
                    other.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    assert other.recv(4096).startswith(b"HTTP/1.1 303")
    finally:
        for sock in held:
            sock.close()


def test_a_listener_holds_no_more_connections_than_its_slots(box: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent connections from many addresses, each within its share, are closed at accept beyond the
    listener's slots, rather than each holding a descriptor of the box until its deadline."""
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS", 6)
    held = [sock for n in range(4) for sock in _half_requests(box.port("https"), 2, f"127.0.0.{10 + n}", sent=b"")]
    try:
        assert [_closed(sock, 2) for sock in held[6:]] == [True] * 2
        assert not any(_closed(sock, 0.1) for sock in held[:6])
    finally:
        for sock in held:
            sock.close()


def _chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_a_body_in_tiny_chunks_is_cut_off_and_one_in_real_chunks_is_answered(box: BoxHandle) -> None:
    """h11 parses each chunk of a chunked body in Python, about 7 us a chunk: 16 KiB sent as 1-octet
    chunks (96 KB on the wire) held the event loop 0.12 s in one step and cost 0.16 s of CPU, from anyone,
    before any login (a POST to the autodiscover answer, the login page...), so a few Mbit/s kept every
    mail session of the box waiting. Past 1,024 chunks averaging under 64 octets the connection is
    closed; a client sending its body in real chunks is answered as before."""
    box.add_user("alice@example.test", "alice's long password")
    https = box.port("https")
    request = OUTLOOK_REQUEST.format(address="alice@example.test").encode()
    head = b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n" \
           b"Connection: close\r\n\r\n"

    def post(body: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", https), timeout=10) as raw, \
                box.client_context.wrap_socket(raw, server_hostname="localhost") as tls:
            reply = b""
            try:
                tls.sendall(head + body)
                while chunk := tls.recv(65536):
                    reply += chunk
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                pass
        return reply

    padded = request + b" " * (16_000 - len(request))  # within the 16 KiB an autodiscover request may have
    assert post(_chunked(padded, 4096)).startswith(b"HTTP/1.1 200")
    assert post(_chunked(request, 1)).startswith(b"HTTP/1.1 200")  # a few hundred tiny chunks are fine
    done = threading.Event()
    longest = loop_gaps(box, done)
    try:
        assert post(_chunked(padded, 1)) == b""
    finally:
        done.set()
    assert longest() < 0.06
