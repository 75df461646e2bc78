"""/console/settings: the settings `letterbox settings list|set` covers (dns_resolver, queue_hold...).

Thin: a value goes through Admin.set_setting, the use-case the CLI calls, so it is checked the same way
and refused with the same words; a refused value saves nothing. A saved one is in force for the running
box at its next use (the settings are read fresh: nothing to restart)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.settings import SETTABLE, SettingError
from web.pages import admin, flash, read_form, redirect, render, require


async def settings_page(request: Request, errors: dict[str, str] | None = None,
                        values: dict[str, str] | None = None) -> Response:
    await require(request, "admin")
    rows = await admin(request).settable()
    shown = {settable.name: value for settable, value in rows} | (values or {})
    return await render(request, "console/settings.html", {
        "title": "Settings", "section": "settings", "rows": rows, "values": shown, "errors": errors or {},
    }, status_code=400 if errors else 200)


async def settings_submit(request: Request) -> Response:
    await require(request, "admin")
    form = await read_form(request)
    name, value = form.get("name", ""), form.get("value", "")
    try:
        shown = await admin(request).set_setting(name, value)
    except SettingError as exc:
        # Beside the setting it is about; at the top (errors[""]) for a name the page does not have.
        return await settings_page(request, {name if name in SETTABLE else "": f"{exc}; nothing was saved."},
                                   {name: value})
    flash(request, f"Saved: {name} is {shown}, in force now (no restart needed).")
    return redirect(f"/console/settings#setting-{name}")


routes = [
    Route("/console/settings", settings_page, methods=["GET"]),
    Route("/console/settings", settings_submit, methods=["POST"]),
]
