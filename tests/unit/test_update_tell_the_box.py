"""letterbox-update after the switch: the box in force records the outcome itself (appliance/update_outcome.py,
tested in tests/integration/test_update_outcome.py) and marks status.json recorded; only a version
without that follower gets `letterbox update status`, a process that costs an emulated guest 4-7 s of CPU.
The venv in force here is a stand-in `letterbox` that notes each call, as an older version's would run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance import update


def _prefix(tmp_path: Path) -> tuple[update.Updater, Path]:
    bin_dir = tmp_path / "prefix" / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    program = bin_dir / "letterbox"
    program.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n', encoding="utf-8")
    program.chmod(0o755)
    data = tmp_path / "data"
    (data / "updates").mkdir(parents=True)
    return update.Updater(update.Options(prefix=tmp_path / "prefix", data=data, user="", say=lambda _: None)), calls


def _status(updater: update.Updater, **values: object) -> None:
    (updater.o.data / "updates" / "status.json").write_text(json.dumps({"state": "done", **values}), encoding="utf-8")


def test_no_status_process_when_the_box_recorded_it(tmp_path: Path) -> None:
    updater, calls = _prefix(tmp_path)
    _status(updater, recorded=True)
    started = time.monotonic()
    updater._tell_the_box()
    assert not calls.exists()
    assert time.monotonic() - started < 1


def test_a_version_without_the_follower_gets_the_status_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(update, "RECORDED_WAIT", 0.5)
    updater, calls = _prefix(tmp_path)
    _status(updater)
    updater._tell_the_box()
    assert calls.read_text(encoding="utf-8").split() == ["--data", str(updater.o.data), "update", "status"]
