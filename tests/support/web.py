"""The web console under starlette's TestClient, with real services (SQLite file, Maildir, TLS files)
built on the TestClient's own event loop, so the app and the services share one loop as in the box."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from appliance.accounts import Accounts
from appliance.auth import Auth, ThrottlePolicy
from appliance.config import DataLayout, ServeConfig
from appliance.db import Database
from appliance.events import EventLog
from appliance.passwords import make_hasher
from appliance.queue.client import Outcome
from appliance.queue.retry import RetryPolicy
from appliance.queue.spool import QueuedMessage, Spool
from appliance.queue.state import QueueState
from appliance.services import Services
from appliance.settings import Settings
from appliance.smtp.probes import RecipientProbeGuard
from appliance.srs import SECRET_FILE, SenderRewriter, load_secret
from appliance.store.mailstore import MailStore
from appliance.tls import TlsManager

T = TypeVar("T")

FAST = make_hasher(time_cost=1, memory_cost_kib=8, parallelism=1)
NO_THROTTLE = ThrottlePolicy(free_failures=10**6, peer_free_failures=10**6, pair_lockout_failures=10**6,
                             peer_lockout_failures=10**6, account_budget=10**6, trusted_budget=10**6)
HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
ADMIN, ADMIN_PASSWORD = "admin", "correct horse battery"
ALICE, ALICE_PASSWORD = "alice@example.test", "alice's long password"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def setup_code(data_dir: Path) -> str:
    """The one-time code the wizard's first step asks for, as the box keeps it in its data directory
    (made at `serve` start, or by the first visit of /setup/1)."""
    from appliance.setup_code import read_code

    code = read_code(data_dir)
    assert code, f"no setup code in {data_dir}: open /setup/1 (or start the box) first"
    return code


async def build_services(root: Path, *, policy: ThrottlePolicy = NO_THROTTLE, hostname: str = HOSTNAME) -> Services:
    layout = DataLayout(root)
    layout.create()
    db = await Database.open(layout.db)
    accounts = Accounts(db, hasher=FAST, data=layout)
    events = EventLog(db)
    return Services(
        config=ServeConfig(data=layout, listen="127.0.0.1", hostname=hostname),
        db=db,
        settings=await Settings.load(db, default_hostname=hostname, hostname_override=hostname),
        accounts=accounts,
        auth=Auth(db, accounts, policy=policy, hasher=FAST, events=events),
        store=MailStore(layout.mail, db, accounts),
        tls=TlsManager(layout.tls, hostname),
        events=events,
        spool=Spool(layout.spool, db),
        srs=SenderRewriter(load_secret(layout.root / SECRET_FILE)),
        recipient_guard=RecipientProbeGuard(),
    )


class WebClient:
    """A TestClient on https://testserver plus the services behind it; `run` calls a coroutine
    function on the app's loop."""

    def __init__(self, client: TestClient, services: Services) -> None:
        self.client = client
        self.services = services

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        assert self.client.portal is not None
        return self.client.portal.call(lambda: fn(*args, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("follow_redirects", False)
        return self.client.get(path, **kwargs)

    def csrf(self, path: str = "/login") -> str:
        page = self.client.get(path, follow_redirects=True)
        m = _CSRF.search(page.text)
        assert m, f"no CSRF token on {path}: {page.status_code} {page.text[:300]}"
        return m.group(1)

    def post(self, path: str, data: dict[str, str] | None = None, *, csrf: str | None = None,
             token_from: str = "/login", **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("follow_redirects", False)
        form = dict(data or {})
        form.setdefault("csrf", csrf if csrf is not None else self.csrf(token_from))
        return self.client.post(path, data=form, **kwargs)

    def login(self, name: str, password: str) -> httpx.Response:
        response = self.post("/login", {"name": name, "password": password})
        assert response.status_code == 303, response.text[:500]
        return response

    def logout(self) -> None:
        self.post("/logout", token_from="/")
        self.client.cookies.clear()

    def setup_code(self) -> str:
        """The first-run code (visiting /setup/1 makes it when the box has not yet)."""
        self.get("/setup/1")
        return setup_code(self.services.config.data.root)

    def step1(self, **changes: str) -> httpx.Response:
        """The wizard's first step, with the setup code and the standard admin and host name."""
        values = {"name": ADMIN, "password": ADMIN_PASSWORD, "password2": ADMIN_PASSWORD, "hostname": HOSTNAME}
        if not self.run(self.services.accounts.has_admin):
            values["code"] = self.setup_code()
        values.update(changes)
        return self.post("/setup/1", values, token_from="/setup/1")

    # --- state ------------------------------------------------------------------------------------
    def add_admin(self, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
        self.run(self.services.accounts.add_admin, name, password)

    def add_domain(self, domain: str = DOMAIN) -> None:
        self.run(self.services.accounts.add_domain, domain)

    def add_user(self, address: str = ALICE, password: str = ALICE_PASSWORD) -> None:
        domain = address.split("@")[1]
        if not self.run(self.services.accounts.is_local_domain, domain):
            self.add_domain(domain)
        self.run(self.services.accounts.add_user, address, password)

    def set_setting(self, key: str, value: str) -> None:
        self.run(self.services.db.set_setting, key, value)

    def setting(self, key: str) -> str | None:
        return self.run(self.services.db.get_setting, key)

    # --- the outbound queue (no queue runs here: messages stay where the test puts them) -----------
    def enqueue(self, recipients: list[str], sender: str = ALICE, data: bytes = b"Subject: hi\r\n\r\nHello.\r\n") -> str:
        return self.run(self.services.spool.enqueue, sender, recipients, data, auth_user=sender or None)

    def attempt(self, message_id: str, outcomes: dict[str, Outcome], now: int | None = None) -> None:
        """Record one delivery attempt as the queue does (a 4xx outcome defers, a 5xx fails)."""
        state = QueueState(self.services.db, self.services.config.data.spool)
        when = int(time.time()) if now is None else now
        jobs = [job for job in self.run(state.due, when + 10**6, 1000, set()) if job.message_id == message_id]
        for job in jobs:
            wanted = {r.address: outcomes[r.address] for r in job.recipients if r.address in outcomes}
            self.run(state.record, job, wanted, policy=RetryPolicy(), now=when)

    def queue(self) -> list[QueuedMessage]:
        return self.run(self.services.spool.messages)

    def set_up(self) -> None:
        """A box past its wizard: admin, domain, setup finished."""
        self.add_admin()
        self.add_domain()
        self.set_setting("setup_step", "7")
        self.set_setting("setup_done", "1")
        self.set_setting("setup_domain", DOMAIN)


@contextmanager
def web_client(root: Path, *, policy: ThrottlePolicy = NO_THROTTLE) -> Iterator[WebClient]:
    from web.app import create_app

    holder: dict[str, Any] = {}

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the real app is made after the loop exists
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await holder["app"](scope, receive, send)

    with TestClient(asgi, base_url="https://testserver") as client:
        assert client.portal is not None
        services = client.portal.call(lambda: build_services(root, policy=policy))
        holder["app"] = create_app(services)
        try:
            yield WebClient(client, services)
        finally:
            client.portal.call(services.db.close)


@contextmanager
def logged_in(root: Path, name: str, password: str) -> Iterator[WebClient]:
    """A box past the wizard, with Alice's mailbox, and `name` logged in: where most console and account
    page tests start."""
    with web_client(root) as client:
        client.set_up()
        client.add_user()
        client.login(name, password)
        yield client
