"""DATA/updates/status.json is replaced as every other state file is (appliance/durable.py): its new
content fsynced before the rename, the directory fsynced after. Before, the box's mark_recorded and
letterbox-update's own status writes renamed a file never fsynced: a power cut soon after could leave
status.json empty (the outcome of the update then never shown) or the old one (recorded twice).
The system calls are read with strace, in a process of their own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_program

MARK_RECORDED = """
import sys
from pathlib import Path
from appliance import update
update.mark_recorded(Path(sys.argv[1]), {"state": "done", "message": "updated"})
"""

WRITE_STATUS = """
import sys
from pathlib import Path
from appliance import update
data = Path(sys.argv[1])
updater = update.Updater(update.Options(prefix=data.parent / "prefix", data=data, user="", say=lambda _: None))
updater._write_status(state="done", message="updated")
"""


@pytest.mark.parametrize("script", [MARK_RECORDED, WRITE_STATUS], ids=["mark_recorded", "write_status"])
def test_status_json_is_fsynced_before_its_rename_and_its_directory_after(tmp_path: Path, script: str) -> None:
    strace = require_program("strace")
    data = tmp_path / "data"
    updates = data / "updates"
    updates.mkdir(parents=True)
    trace = tmp_path / "trace"
    subprocess.run([strace, "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                    "-o", str(trace), sys.executable, "-c", script, str(data)],
                   check=True, capture_output=True, timeout=60)
    calls = [line for line in trace.read_text().splitlines() if str(updates) in line]
    renames = [i for i, line in enumerate(calls) if re.search(r"rename\w*\(.*status\.json", line)]
    assert len(renames) == 1, calls
    [renamed] = renames
    tmp = re.search(r'"([^"]*/\.status\.json\.[0-9a-f]+)"', calls[renamed])
    assert tmp is not None, calls[renamed]
    assert any(re.match(rf"(\d+ +)?f(data)?sync\(\d+<{re.escape(tmp[1])}>\) = 0", line) for line in calls[:renamed]), calls
    assert any(re.match(rf"(\d+ +)?fsync\(\d+<{re.escape(str(updates))}>\) = 0", line) for line in calls[renamed:]), calls
    assert (updates / "status.json").read_text(encoding="utf-8").count('"state": "done"') == 1
