"""/console/log and /account/log: the delivery log, searched by address, text, result and date. Admins
see every row; a mailbox owner sees only the rows of their own mailbox (owner = their address)."""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import time_zone
from appliance.delivery_log import RESULTS, Search
from web.pages import render, require, services

MAX_QUERY = 320


def _day_start(text: str, zone_name: str, *, next_day: bool = False) -> float | None:
    """'2026-11-28' at midnight in the box's time zone (Unix seconds); None when empty, not a date, or
    at the calendar's ends (a date picker's 9999-12-31 has no next day: it answered 500)."""
    try:
        day = dt.date.fromisoformat(text.strip())
        if next_day:
            day += dt.timedelta(days=1)
        return dt.datetime.combine(day, dt.time(), time_zone.zone(zone_name)).timestamp()
    except (ValueError, OverflowError):
        return None


def _search(request: Request, owner: str | None) -> tuple[Search, dict[str, str]]:
    params = {key: request.query_params.get(key, "")[:MAX_QUERY] for key in ("address", "text", "result", "since", "until")}
    zone_name = services(request).settings.now.time_zone
    return Search(address=params["address"].strip(), text=params["text"].strip(),
                  result=params["result"] if params["result"] in RESULTS else "",
                  since=_day_start(params["since"], zone_name),
                  until=_day_start(params["until"], zone_name, next_day=True), owner=owner), params


async def console_log(request: Request) -> Response:
    await require(request, "admin")
    query, params = _search(request, None)
    rows = await services(request).delivery_log.search(query)
    return await render(request, "console/log.html", {
        "title": "Delivery log", "section": "log", "rows": rows, "values": params, "results": RESULTS,
        "action": "/console/log", "admin_view": True})


async def account_log(request: Request) -> Response:
    principal = await require(request, "user")
    query, params = _search(request, principal.name)
    rows = await services(request).delivery_log.search(query)
    return await render(request, "account_log.html", {
        "title": "Your mail log", "rows": rows, "values": params, "results": RESULTS, "action": "/account/log",
        "admin_view": False})


routes = [
    Route("/console/log", console_log, methods=["GET"]),
    Route("/account/log", account_log, methods=["GET"]),
]
