"""/console/updates: the running version, the last update's outcome, and a newer version uploaded as a
bundle (make bundle). Thin: the upload is streamed into DATA/updates/ and handed to
Admin.stage_update, the same use-case as `letterbox update upload`; letterbox-update (root, started by
letterbox-update.path) installs it, restarts the box and rolls back if the new version does not come up."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import bundle, update
from appliance.disk_full import RESERVE_OCTETS
from web.pages import admin, flash, redirect, render, require, services
from web.uploads import declared_length, read_upload

MAX_UPLOAD = bundle.MAX_BYTES + 1024 * 1024  # the bundle plus the form around it


async def page(request: Request) -> Response:
    await require(request, "admin")
    state = await admin(request).update_state()
    return await render(request, "console/updates.html", {
        "title": "Updates", "section": "updates", "state": state, "max_size": bundle.MAX_BYTES,
    })


def _reserve_room(request: Request, free: int) -> int:
    """Refuse, before a byte of it is written, a bundle that would not fit above the reserve kept for new
    mail (as a backup upload is, web/routes/restore.py): it was written whatever the free space, so a
    256 MiB upload to a nearly full disk took the reserve and new mail was refused while it arrived.
    Counts the other update uploads arriving now; returns the bytes reserved (given back by the caller)."""
    length = declared_length(request)
    arriving: int = getattr(request.app.state, "updates_arriving", 0)
    if length > MAX_UPLOAD:
        raise HTTPException(413, f"A bundle is at most {bundle.MAX_BYTES >> 20} MiB.")
    if length + arriving + RESERVE_OCTETS > free:
        raise HTTPException(413, f"The bundle is too large for the free space on this box ({free // 2**20} MiB free,"
                                 f" of which {RESERVE_OCTETS // 2**20} MiB stay free for new mail"
                                 + (", beside the uploads arriving now)." if arriving else ")."))
    request.app.state.updates_arriving = arriving + length  # no await since the check: two cannot both pass
    return length


async def _save_upload(request: Request, folder: Path) -> Path | None:
    """The uploaded file, written into `folder` as it arrives, once the fields before it carried this
    session's CSRF token (web/uploads.read_upload)."""

    async def place(_fields: dict[str, str]) -> Path:
        await asyncio.to_thread(folder.mkdir, mode=0o700, exist_ok=True)
        return folder / f".upload-{secrets.token_hex(4)}"

    return (await read_upload(request, place, max_fields=5))[1]


async def upload(request: Request) -> Response:
    await require(request, "admin")
    folder = services(request).config.data.root / update.UPDATES
    free = (await asyncio.to_thread(shutil.disk_usage, services(request).config.data.root)).free
    reserved = _reserve_room(request, free)
    try:
        path = await _save_upload(request, folder)
    finally:
        request.app.state.updates_arriving -= reserved
    if path is None:
        flash(request, "Not installed: choose the bundle file (letterbox-bundle-VERSION-MACHINE.tar).", problem=True)
        return redirect("/console/updates")
    try:
        info = await admin(request).stage_update(path)
    except bundle.BundleError as exc:
        flash(request, f"Not installed: {exc}.", problem=True)
        return redirect("/console/updates")
    finally:
        await asyncio.to_thread(path.unlink, True)  # moved away when it was accepted
    flash(request, f"Letterbox {info.version} is being installed. A backup is made first; then the box restarts"
                   " (a minute or two). If the new version does not come up, the box goes back to this one.")
    return redirect("/console/updates")


routes = [
    Route("/console/updates", page, methods=["GET"]),
    Route("/console/updates", upload, methods=["POST"], max_body_size=MAX_UPLOAD),
]
