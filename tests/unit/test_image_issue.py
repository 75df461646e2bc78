"""The image's letterbox-issue (image/overlay/usr/local/sbin/letterbox-issue): root puts the setup code
from the data directory on the console's login screen, a world-readable file under /etc/issue.d.
letterbox-issue.path starts it whenever the box's user changes that file, so the file is that user's
input: a link to a file only root may read must not be copied out, nor a FIFO hold the script."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "image/overlay/usr/local/sbin/letterbox-issue"
CODE = "ABCD-EFGH-JKMN"


def run_issue(code_file: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LETTERBOX_ISSUE_CODE": str(code_file), "LETTERBOX_ISSUE_OUT": str(out),
           "LETTERBOX_ISSUE_RELOAD": "true"}
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_setup_code_is_shown_and_taken_off(tmp_path: Path) -> None:
    code_file, out = tmp_path / "setup-code", tmp_path / "issue.d" / "50-letterbox-setup-code.issue"
    code_file.write_text(CODE + "\n")
    assert run_issue(code_file, out).returncode == 0
    assert CODE in out.read_text()
    code_file.unlink()
    assert run_issue(code_file, out).returncode == 0
    assert not out.exists()


def test_a_link_to_a_secret_file_is_not_copied_to_the_login_screen(tmp_path: Path) -> None:
    """The box's user made setup-code a link to /etc/shadow (here a stand-in): root's `cat` followed it
    and wrote the hashes into the issue file, which anyone on the box, that user too, can read."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$y$j9T$secret-hash:20000:0:99999:7:::\n")
    code_file, out = tmp_path / "setup-code", tmp_path / "issue.d" / "50-letterbox-setup-code.issue"
    code_file.symlink_to(secret)
    assert run_issue(code_file, out).returncode == 0
    assert not out.exists()
    # Not a link, but not a code either: a file the user wrote is shown only in a code's shape.
    code_file.unlink()
    code_file.write_text(f"{CODE}\nmore text for the screen\n")
    run_issue(code_file, out)
    assert "more text" not in (out.read_text() if out.exists() else "")


def test_a_fifo_does_not_hold_the_script(tmp_path: Path) -> None:
    code_file, out = tmp_path / "setup-code", tmp_path / "issue.d" / "50-letterbox-setup-code.issue"
    os.mkfifo(code_file)
    started = time.monotonic()
    assert run_issue(code_file, out).returncode == 0
    assert time.monotonic() - started < 30
    assert not out.exists()
