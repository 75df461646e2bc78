"""The Disk item of the status checklist counts as df does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from appliance.disk_full import used_percent


def test_disk_percentage_is_the_one_df_shows(tmp_path: Path) -> None:
    """Of the space a user can fill, as df counts it: a file system's blocks reserved for root (5 % on
    ext4 by default, far more on some) are neither used nor available to the box."""
    usage = shutil.disk_usage(tmp_path)
    shown = subprocess.run(["df", "--output=pcent", str(tmp_path)], capture_output=True, text=True, check=True)
    assert abs(used_percent(usage.used, usage.free) - int(shown.stdout.split()[-1].rstrip("%"))) <= 1
    assert used_percent(0, 0) == 0
    assert used_percent(1, 999) == 1
