"""/console/updates: the running version, the last update's outcome, and a newer version uploaded as a
bundle (make bundle). Thin: the upload is streamed into DATA/updates/ and handed to
Admin.stage_update, the same use-case as `letterbox update upload`; letterbox-update (root, started by
letterbox-update.path) installs it, restarts the box and rolls back if the new version does not come up."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import bundle, update
from web.pages import admin, flash, redirect, render, require, services
from web.security import CSRF_FIELD, csrf_ok
from web.uploads import save_private

MAX_UPLOAD = bundle.MAX_BYTES + 1024 * 1024  # the bundle plus the form around it


async def page(request: Request) -> Response:
    await require(request, "admin")
    state = await admin(request).update_state()
    return await render(request, "console/updates.html", {
        "title": "Updates", "section": "updates", "state": state, "max_size": bundle.MAX_BYTES,
    })


async def _save_upload(request: Request, folder: Path) -> Path | None:
    """The uploaded file, checked for this session's CSRF token first, streamed into `folder`."""
    try:
        form = await request.form(max_files=1, max_fields=5, max_part_size=64 * 1024)
    except HTTPException:
        raise
    except Exception as exc:  # malformed multipart: the client's fault
        raise HTTPException(400, "The form could not be read.") from exc
    try:
        upload = next((v for _, v in form.multi_items() if isinstance(v, UploadFile)), None)
        token = next((v for k, v in form.multi_items() if k == CSRF_FIELD and isinstance(v, str)), None)
        if not csrf_ok(request.session, token):
            raise HTTPException(403, "This form has expired or came from another site. Reload the page and try again.")
        if upload is None or not upload.filename:
            return None
        target = folder / f".upload-{secrets.token_hex(4)}"

        await asyncio.to_thread(folder.mkdir, mode=0o700, exist_ok=True)
        await asyncio.to_thread(save_private, upload.file, target)
        return target
    finally:
        await form.close()


async def upload(request: Request) -> Response:
    await require(request, "admin")
    folder = services(request).config.data.root / update.UPDATES
    path = await _save_upload(request, folder)
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
