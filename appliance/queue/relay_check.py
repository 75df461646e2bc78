"""The console's "Test the relay": one session with the smarthost, opened exactly as the queue opens
it (same resolver, same TLS rules and certificate checks, same login), then QUIT without sending.

Used by the web console's Sending page and wizard step. Nothing here is stored or logged beyond what
the queue's own session code logs (never the password).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from appliance.queue.client import AbortSignal, CaFileError, OutboundSession, SessionFailed, verifying_context
from appliance.queue.mx import RouteError, host_hops, relay_loop
from appliance.queue.resolver import make_async_resolver
from appliance.queue.smarthost import Smarthost

CHECK_TIMEOUT = 15.0  # seconds for the whole test: lookup, connect, TLS, EHLO, AUTH, QUIT


@dataclass(frozen=True)
class RelayCheck:
    ok: bool
    detail: str  # what worked ('relay.example.net[192.0.2.1], TLSv1.3 ..., logged in as me') or the error


async def check_relay(
    relay: Smarthost, *, helo_name: str, resolver: str | None = None, seconds: float = CHECK_TIMEOUT,
    is_own: Callable[[str], bool] = lambda address: False,
) -> RelayCheck:
    """Connect to `relay` as the queue would (`resolver`: the dns_resolver setting, None for the
    system's), log in, and say QUIT, all within `seconds`; a relay at an address of this box's own
    listener on its port (`is_own`) is refused, as the queue refuses it. Never raises for a network or relay problem: the result says."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        hops = await asyncio.wait_for(host_hops(make_async_resolver(resolver), relay.host, system=resolver is None),
                                      seconds)
    except RouteError as exc:
        return RelayCheck(False, exc.text)
    except TimeoutError:
        return RelayCheck(False, f"no answer from DNS for the relay host {relay.host} within {seconds:g} s")
    if any(is_own(hop.address) for hop in hops):
        return RelayCheck(False, relay_loop(relay.host))
    try:
        context = await asyncio.to_thread(verifying_context, relay.ca_file)
    except CaFileError as exc:
        return RelayCheck(False, exc.text)

    abort = AbortSignal()
    left = max(1.0, deadline - loop.time())

    def session() -> RelayCheck:
        try:
            opened = OutboundSession.open(
                hops, port=relay.port, helo_name=helo_name,
                tls_policy="implicit" if relay.tls == "implicit" else "required",
                tls_context=context, login=relay.login, connect_timeout=left, command_timeout=left, abort=abort,
            )
        except SessionFailed as exc:
            return RelayCheck(False, exc.text)
        try:
            parts = [str(opened.hop), opened.tls or "TLS"]
            parts.append(f"logged in as {relay.user}" if relay.login else "no login (none configured)")
            return RelayCheck(True, ", ".join(parts))
        finally:
            opened.close()  # QUIT: nothing is sent

    future: asyncio.Future[RelayCheck] = loop.create_future()

    def run() -> None:
        try:
            result = session()
        except Exception as exc:  # noqa: BLE001  a bug rather than the relay; still an answer for the page
            result = RelayCheck(False, f"the test failed: {exc}")
        def settle() -> None:
            if not future.done():
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop may be gone
            loop.call_soon_threadsafe(settle)

    # A daemon thread: a relay that stops answering never holds up the process's exit.
    threading.Thread(target=run, name="letterbox-relay-check", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), left + 1.0)
    except TimeoutError:
        abort.abort()  # shuts the socket under the thread
        return RelayCheck(False, f"{relay.host}:{relay.port} did not finish within {seconds:g} s")
