"""/console/backups: the backup key and its emergency kit, backups made now (in the background, with
progress), the list under backups/ with downloads, and one mailbox put back from one of them. Thin:
every action is an appliance.backup use-case, the same ones `letterbox backup ...` calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from appliance import backup, backup_restic
from web.display import attachment
from web.pages import admin, flash, read_form, redirect, render, require, services

MAX_SECRET = 4096  # a kit is about 300 characters; a passphrase fits easily


async def _keep(request: Request) -> int:
    text = await services(request).db.get_setting(backup.KEEP_SETTING) or ""
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else backup.DEFAULT_KEEP


async def page(request: Request) -> Response:
    await require(request, "admin")
    svc = services(request)
    job = svc.backups.current
    files = await asyncio.to_thread(backup.list_backups, svc.config.data.backups)
    return await render(request, "console/backups.html", {
        "title": "Backups", "section": "backups",
        "recipient": await svc.db.get_setting(backup.RECIPIENT_SETTING) or "",
        "job": job, "files": files, "keep": await _keep(request), "download": svc.backups.download,
        "schedule": await backup.read_schedule(svc.db),
        "restic": await backup_restic.read_target(svc.db),
    })


async def make_key(request: Request) -> Response:
    """The emergency kit, as a download: the box keeps only its public half."""
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    if await svc.db.get_setting(backup.RECIPIENT_SETTING) and values.get("confirm") != "replace":
        flash(request, "The box has a backup key already: tick the box to replace it.", problem=True)
        return redirect("/console/backups")
    kit = await admin(request).make_backup_key()
    return Response(kit.text, media_type="text/plain; charset=utf-8", headers={
        "Content-Disposition": 'attachment; filename="letterbox-emergency-kit.txt"',
        "Cache-Control": "no-store",
    })


async def create(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    keep_text = values.get("keep", "")
    if keep_text.isascii() and keep_text.isdigit() and 0 < int(keep_text) <= 1000:
        await svc.db.set_setting(backup.KEEP_SETTING, values["keep"])
    keep = await _keep(request)
    # A passphrase instead of the box's key, for this backup only (never stored).
    passphrase = values.get("passphrase", "")[:MAX_SECRET]
    if passphrase and len(passphrase) < 12:
        flash(request, "Not started: a passphrase needs at least 12 characters.", problem=True)
        return redirect("/console/backups")
    if not passphrase and not await svc.db.get_setting(backup.RECIPIENT_SETTING):
        flash(request, "Not started: make the backup key first, or give a passphrase.", problem=True)
        return redirect("/console/backups")

    box = admin(request)

    async def work(progress: backup.Progress) -> str:
        made = await box.create_backup(progress=progress, keep=keep, passphrase=passphrase)
        return f"Backup made: {made.path.name} ({made.manifest['messages']} messages)."

    if svc.backups.start("backup", work) is None:
        flash(request, "A backup or restore is already running: wait for it to finish.", problem=True)
    return redirect("/console/backups")


async def schedule(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    hour = values.get("hour", "")
    try:
        await admin(request).set_backup_schedule(enabled=values.get("enabled") == "yes",
                                                 hour=int(hour) if hour.isascii() and hour.isdigit() else -1,
                                                 target=values.get("target", "").strip())
    except backup.BackupError as exc:
        flash(request, f"Not saved: {exc}.", problem=True)
        return redirect("/console/backups")
    flash(request, "Schedule saved.")
    return redirect("/console/backups")


async def restic(request: Request) -> Response:
    """The restic repository for off-box copies: set (made when new), or forgotten. The password
    field is never filled in by the page; left empty, the one already set is kept."""
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    repo = values.get("repo", "").strip()[:MAX_SECRET]
    password = values.get("password", "")[:MAX_SECRET]
    if repo and not password:
        current = await backup_restic.read_target(svc.db)
        password = current.password if current is not None and current.repo == repo else ""
    try:
        made = await admin(request).set_restic("" if values.get("off") == "yes" else repo, password)
    except backup.BackupError as exc:
        flash(request, f"Not saved: {exc}.", problem=True)
        return redirect("/console/backups")
    flash(request, "restic copies off." if values.get("off") == "yes" or not repo else
          ("restic repository made and set." if made else "restic repository set."))
    return redirect("/console/backups")


async def restic_send(request: Request) -> Response:
    """Send the newest backup under backups/ to the restic repository now (in the background)."""
    await require(request, "admin")
    await read_form(request)
    svc = services(request)
    files = await asyncio.to_thread(backup.list_backups, svc.config.data.backups)
    if not files:
        flash(request, "Nothing to send: make a backup first.", problem=True)
        return redirect("/console/backups")
    box = admin(request)

    async def work(progress: backup.Progress) -> str:
        progress.stage = "sending to restic"
        snapshot = await box.send_to_restic(files[0].path)
        return f"{files[0].path.name} sent to the restic repository (snapshot {snapshot})."

    if svc.backups.start("backup", work) is None:
        flash(request, "A backup or restore is already running: wait for it to finish.", problem=True)
    return redirect("/console/backups")


def _named(request: Request, name: str) -> Path:
    """A file of the list under backups/, by its exact name; never a path."""
    for item in backup.list_backups(services(request).config.data.backups):
        if item.path.name == name:
            return item.path
    raise HTTPException(404, "No such backup.")


DOWNLOAD_CHUNK = 1024 * 1024


async def download(request: Request) -> Response:
    """The file, streamed; the bytes sent so far are kept for the page's progress (it polls)."""
    await require(request, "admin")
    path = await asyncio.to_thread(_named, request, str(request.path_params["name"]))
    jobs = services(request).backups
    size = (await asyncio.to_thread(path.stat)).st_size
    transfer = backup.Transfer(path.name, backup.Progress(total=size, stage="downloading"))
    jobs.download = transfer

    async def body() -> AsyncIterator[bytes]:
        source = await asyncio.to_thread(open, path, "rb")
        try:
            while chunk := await asyncio.to_thread(source.read, DOWNLOAD_CHUNK):
                yield chunk
                transfer.progress.done += len(chunk)
            transfer.progress.stage = "done"
        finally:
            if transfer.progress.stage != "done":
                transfer.progress.stage = "stopped"
            await asyncio.to_thread(source.close)

    return StreamingResponse(body(), media_type="application/octet-stream", headers={
        "Content-Length": str(size), "Cache-Control": "no-store",
        "Content-Disposition": attachment(path.name),
    })


async def restore_mailbox(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    try:
        path = await asyncio.to_thread(_named, request, values.get("file", ""))
    except HTTPException:
        flash(request, "Not restored: pick a backup from the list.", problem=True)
        return redirect("/console/backups")
    text = values.get("secret", "")[:MAX_SECRET]
    address = values.get("address", "").strip().lower()
    folder = values.get("folder", "").strip() or None
    if not text.strip() or "@" not in address:
        flash(request, "Not restored: give the mailbox's address and the emergency kit or passphrase.", problem=True)
        return redirect("/console/backups")
    secret = backup.Secret.from_text(text) if "AGE-SECRET-KEY-" in text else backup.Secret(passphrase=text.strip())

    box = admin(request)

    async def work(progress: backup.Progress) -> str:
        done = await box.restore_mailbox(path, secret, address, folder)
        again = " (the mailbox was made again, with its old password)" if done.created else ""
        return f"Restored {done.messages} messages into {done.address}{again}."

    if svc.backups.start("restore", work) is None:
        flash(request, "A backup or restore is already running: wait for it to finish.", problem=True)
    return redirect("/console/backups")


routes = [
    Route("/console/backups", page, methods=["GET"]),
    Route("/console/backups/key", make_key, methods=["POST"]),
    Route("/console/backups/create", create, methods=["POST"]),
    Route("/console/backups/schedule", schedule, methods=["POST"]),
    Route("/console/backups/restic", restic, methods=["POST"]),
    Route("/console/backups/restic-send", restic_send, methods=["POST"]),
    Route("/console/backups/restore-mailbox", restore_mailbox, methods=["POST"]),
    Route("/console/backups/download/{name}", download, methods=["GET"]),
]
