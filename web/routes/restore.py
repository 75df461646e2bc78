"""Restoring the whole box from a backup: from the wizard's first screen on a fresh box ("Restore from
a backup" beside "Start fresh", as Home Assistant's onboarding does) and from the console's Backups
page. The backup is unpacked and verified beside the data directory while the box keeps running; then
`letterbox serve` stops the services, switches the data directory over in one step and starts again
on the restored data (appliance/app.py), keeping the old data aside.

On a fresh box the one-time setup code is asked first, as in step 1: without it nobody can replace an
unclaimed box's data with their own."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance import backup, setup_code
from appliance.disk_full import RESERVE_OCTETS
from web.pages import admin, flash, peer, read_form, redirect, render, require, services
from web.uploads import declared_length, read_upload

MAX_UPLOAD = 256 * 1024**3  # a backup is one file of any size a disk holds; it is streamed to disk
MAX_SECRET = 4096


def _secret(text: str) -> backup.Secret:
    text = text[:MAX_SECRET]
    return backup.Secret.from_text(text) if "AGE-SECRET-KEY-" in text else backup.Secret(passphrase=text.strip())


def start_restore(request: Request, path: Path, secret: backup.Secret, *, remove_after: bool,
                  wizard: bool = False) -> bool:
    """Stage the backup in the background, then ask `serve` to switch over; False when a job runs.
    `wizard`: the first-run wizard's, whose pages may show it."""
    svc = services(request)
    root = svc.config.data.root

    async def work(progress: backup.Progress) -> str:
        try:
            staged = await asyncio.to_thread(backup.stage_full, path, secret, root, progress=progress)
        finally:
            if remove_after:
                await asyncio.to_thread(path.unlink, True)
        await svc.events.record("backup", f"restore staged from {path.name} (made {staged.manifest.get('created')}"
                                          f" on {staged.manifest.get('host')}); the box restarts on it")
        svc.backups.switch_to(staged)
        return (f"Verified {staged.files} files from {staged.manifest.get('host')} ({staged.manifest.get('created')}):"
                " the box is restarting on the restored data. Log in with the restored accounts.")

    job = svc.backups.start("restore", work)
    if job is not None and wizard:
        svc.backups.wizard = job
        # This browser session gave the setup code: it alone sees the restore's progress and result.
        svc.backups.wizard_owner = request.session[OWNER_KEY] = secrets.token_urlsafe(18)
    return job is not None


OWNER_KEY = "restore"  # the session's key holding the wizard restore's owner token


def started_here(request: Request) -> bool:
    """Whether this browser session started the wizard's restore (and so gave the setup code). The
    wizard's pages answer anyone while the box has no administrator; the restore's progress and result
    (the backup's host name, how many files) were shown to every visitor."""
    owner = services(request).backups.wizard_owner
    mine = request.session.get(OWNER_KEY, "")
    return bool(owner) and isinstance(mine, str) and secrets.compare_digest(mine.encode(), owner.encode())


async def wizard_page(request: Request) -> Response:
    svc = services(request)
    job = svc.backups.wizard_job()  # never a console job: this page answers anyone
    if await svc.accounts.has_admin() and job is None:
        return redirect("/login")
    if not await svc.accounts.has_admin():
        await asyncio.to_thread(setup_code.ensure_code, svc.config.data.root)
    elsewhere = job is not None and not started_here(request)
    if elsewhere and job is not None and job.error and not job.running:
        job = None  # another visitor's failed try: the form, without its error
    return await render(request, "setup/restore.html", {
        "title": "Restore from a backup", "job": job, "elsewhere": elsewhere, "steps": (), "step": 0, "furthest": 0,
        "code_file": setup_code.code_path(svc.config.data.root),
    })


def _free_space(request: Request) -> int:
    """The free space beside the data directory, where the upload is written as it arrives (no spool
    file in the temporary directory any more) and the restore then unpacks next to it."""
    return shutil.disk_usage(services(request).config.data.root.resolve().parent).free


async def _reserve_room(request: Request) -> int:
    """Refuse an upload larger than the free space it needs before reading any of it (so a backup
    that cannot fit is refused at once, not after an hour), counting the uploads still arriving:
    each was checked alone, so on a fresh box anyone could send several at once, each up to half the
    free space, before the setup code (a field of the same form) was read. Returns the bytes reserved
    (uploads.declared_length: a body in chunks is refused)."""
    length = declared_length(request)
    free = await asyncio.to_thread(_free_space, request)
    jobs = services(request).backups
    # The reserve kept for new mail stays free too: on a disk with less than twice the reserve free, an
    # upload of half the free space took part of it (new mail refused while it arrived and waited).
    if length > MAX_UPLOAD or (length + jobs.arriving) * 2 + RESERVE_OCTETS > free:
        raise HTTPException(413, f"The backup is too large for the free space on this box ({free // 2**20} MiB"
                                 " free; the upload and its unpacked copy both need room, and"
                                 f" {RESERVE_OCTETS // 2**20} MiB stay free for new mail"
                                 + (", beside the uploads arriving now)." if jobs.arriving else ")."))
    jobs.arriving += length  # no await between the check and this: two uploads cannot both pass on one figure
    return length


Gate = Callable[[dict[str, str]], Awaitable[bool]]


async def _allow(_fields: dict[str, str]) -> bool:
    return True


async def _read_upload(request: Request, gate: Gate = _allow) -> tuple[dict[str, str], Path | None]:
    """The form's text fields and the uploaded backup, written beside the data directory (the staging
    directory's file system) as it arrives. Before a byte of the file is written, the fields before it
    must carry this session's CSRF token and pass `gate` (the wizard's setup code); a refused file is
    read to its end (so the browser gets the answer) and kept nowhere, and its room is given back at
    once."""
    reserved = await _reserve_room(request)
    jobs = services(request).backups

    async def place(fields: dict[str, str]) -> Path | None:
        nonlocal reserved
        if await gate(fields):
            return backup.upload_path(services(request).config.data.root)
        jobs.arriving -= reserved
        reserved = 0
        return None

    try:
        return await read_upload(request, place)
    finally:
        jobs.arriving -= reserved


async def wizard_submit(request: Request) -> Response:
    svc = services(request)
    if await svc.accounts.has_admin():
        return redirect("/login")
    verdict: list[bool] = []  # the setup code's, once the gate has looked at it

    async def code_first(fields: dict[str, str]) -> bool:
        """The setup code comes before the file in the form: a stranger's file is never written."""
        verdict.append(not await svc.accounts.has_admin() and await setup_code.verify(
            svc.auth.throttle, svc.config.data.root, fields.get("code", ""), peer(request)))
        return verdict[0]

    values, path = await _read_upload(request, code_first)
    try:
        if await svc.accounts.has_admin():
            # Made while the upload arrived (a first step in another tab, `letterbox admin add`): the
            # box is claimed now, and only its administrator may replace it, from the console.
            return redirect("/login")
        if not (verdict[0] if verdict else await setup_code.verify(
                svc.auth.throttle, svc.config.data.root, values.get("code", ""), peer(request))):
            flash(request, "Not restored: that is not this box's setup code (see the box's screen or its setup-code file).", problem=True)
            return redirect("/setup/restore")
        if path is None or not values.get("secret", "").strip():
            flash(request, "Not restored: choose the backup file and give its emergency kit or passphrase.", problem=True)
            return redirect("/setup/restore")
        if not start_restore(request, path, _secret(values["secret"]), remove_after=True, wizard=True):
            flash(request, "A restore is already running.", problem=True)
        else:
            path = None  # the job removes it
        return redirect("/setup/restore")
    finally:
        if path is not None:
            await asyncio.to_thread(path.unlink, True)


async def console_submit(request: Request) -> Response:
    """The whole box from a backup under backups/ (the console's Backups page)."""
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    files = {b.path.name: b.path for b in await asyncio.to_thread(backup.list_backups, svc.config.data.backups)}
    path = files.get(values.get("file", ""))
    if path is None or not values.get("secret", "").strip() or values.get("confirm") != "yes":
        flash(request, "Not restored: pick a backup, give its kit or passphrase and tick the confirmation.", problem=True)
        return redirect("/console/backups")
    if not start_restore(request, path, _secret(values["secret"]), remove_after=False):
        flash(request, "A backup or restore is already running: wait for it to finish.", problem=True)
    return redirect("/console/backups")


async def console_upload(request: Request) -> Response:
    """A backup file uploaded from the administrator's computer, for the whole box or one mailbox:
    kept beside the data directory, its manifest read with the given key and shown for confirmation."""
    await require(request, "admin")
    values, path = await _read_upload(request)
    svc = services(request)
    try:
        address = values.get("address", "").strip().lower()
        if path is None or not values.get("secret", "").strip():
            flash(request, "Not restored: choose the backup file and give its emergency kit or passphrase.", problem=True)
            return redirect("/console/backups")
        if values.get("what") == "mailbox" and "@" not in address:
            flash(request, "Not restored: give the address of the mailbox to put back.", problem=True)
            return redirect("/console/backups")
        secret = _secret(values["secret"])
        upload = path

        def manifest() -> dict[str, Any]:
            with open(upload, "rb") as source:
                return backup.read_manifest(source, secret)

        try:
            found = await asyncio.to_thread(manifest)
        except backup.BackupError as exc:
            flash(request, f"Not restored: {exc}", problem=True)
            return redirect("/console/backups")
        whole = values.get("what") != "mailbox"
        pending = backup.PendingRestore(upload, secret, found, "" if whole else address,
                                        (values.get("folder", "").strip() or None) if not whole else None)
        token = svc.backups.hold(pending)
        path = None  # kept until confirmed, cancelled or expired
        return await render(request, "console/backup_confirm.html", {
            "title": "Confirm the restore", "section": "backups", "token": token, "pending": pending,
            "manifest": found, "size": pending.path.stat().st_size,
        })
    finally:
        if path is not None:
            await asyncio.to_thread(path.unlink, True)


async def console_confirm(request: Request) -> Response:
    await require(request, "admin")
    values = await read_form(request)
    svc = services(request)
    pending = svc.backups.take(values.get("token", ""))
    if pending is None:
        flash(request, "Nothing to restore: the upload expired or was cancelled. Upload it again.", problem=True)
        return redirect("/console/backups")
    if values.get("confirm") != "yes":
        await asyncio.to_thread(pending.path.unlink, True)
        flash(request, "Restore cancelled; the uploaded file was removed.")
        return redirect("/console/backups")
    if not pending.address:
        started = start_restore(request, pending.path, pending.secret, remove_after=True)
    else:
        box = admin(request)

        async def work(progress: backup.Progress) -> str:
            try:
                done = await box.restore_mailbox(pending.path, pending.secret, pending.address, pending.folder,
                                                 progress=progress)
            finally:
                await asyncio.to_thread(pending.path.unlink, True)
            again = " (the mailbox was made again, with its old password)" if done.created else ""
            return f"Restored {done.messages} messages into {done.address}{again}."

        started = svc.backups.start("restore", work) is not None
    if not started:
        await asyncio.to_thread(pending.path.unlink, True)
        flash(request, "A backup or restore is already running: wait for it to finish, then upload again.", problem=True)
    return redirect("/console/backups")


async def console_progress(request: Request) -> Response:
    await require(request, "admin")
    return JSONResponse(services(request).backups.status(), headers={"Cache-Control": "no-store"})


async def wizard_progress(request: Request) -> Response:
    """The wizard's restore, polled by its page (an unclaimed box, or the restore that claimed it). It
    answers anyone: a job the console started (a backup, a mailbox put back) is not shown, nor the
    download in flight; they were, to anyone, once the box had run one. The restore's progress and
    result are the browser's that started it; others learn only that it runs."""
    svc = services(request)
    job = svc.backups.wizard_job()
    if await svc.accounts.has_admin() and job is None:
        raise HTTPException(404)
    status = svc.backups.status()
    if job is None:
        status["job"] = None
    elif not started_here(request):  # that one runs, nothing of what it restores
        status["job"] = {"kind": job.kind, "running": job.running, "percent": 0, "done": 0, "total": 0,
                         "stage": "", "result": "", "error": ""}
    status["download"] = None
    return JSONResponse(status, headers={"Cache-Control": "no-store"})


routes = [
    Route("/setup/restore", wizard_page, methods=["GET"]),
    Route("/setup/restore", wizard_submit, methods=["POST"], max_body_size=MAX_UPLOAD),
    Route("/console/backups/restore", console_submit, methods=["POST"]),
    Route("/console/backups/upload", console_upload, methods=["POST"], max_body_size=MAX_UPLOAD),
    Route("/console/backups/confirm", console_confirm, methods=["POST"]),
    Route("/console/backups/progress", console_progress, methods=["GET"]),
    Route("/setup/restore/progress", wizard_progress, methods=["GET"]),
]
