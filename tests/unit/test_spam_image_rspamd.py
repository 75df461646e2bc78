"""The rspamd + Redis configuration the image ships (issue 16): its public-suffix list, its languages,
the scripts its rspamd.service drop-in runs, and that drop-in as systemd reads it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require_program
from tests.support.rspamd import (
    DROP_IN,
    HS_HELPER_EXIT,
    IMAGE_CONF_LOCAL,
    IMAGE_LANGUAGES,
    IMAGE_LOCAL_D,
    IMAGE_TLD,
    TLD_FILE,
    WARM_TLD,
    compact_suffixes,
    icann_suffixes,
    write_conf_local,
)


def rules(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("//")]


def test_the_image_list_has_every_top_level_domain_of_rspamds_own() -> None:
    """rspamd finds a URL written without a scheme by its TLD: the compact list must not lose one. A
    new rspamd list fails this: regenerate with tests.support.rspamd.write_image_tld."""
    require_program("rspamd")
    full = icann_suffixes(TLD_FILE.read_text(encoding="utf-8"))
    ours = rules(IMAGE_TLD)
    assert ours == compact_suffixes(TLD_FILE.read_text(encoding="utf-8"))
    assert {rule for rule in full if "." not in rule} <= set(ours)
    assert {"co.uk", "com.au", "com", "de"} <= set(ours)
    assert "blogspot.com" not in ours  # the private section is left out (see the file's header)
    assert len(ours) < len(full) / 2


def test_rspamd_and_the_warm_up_script_read_the_same_list() -> None:
    """letterbox-warm-tld.lua compiles what rspamd will look for in its cache: another file would be
    another cache entry, and rspamd's main process would compile its own and keep the compiler's heap."""
    [url_tld] = re.findall(r'^url_tld\s*=\s*"([^"]+)";', (IMAGE_LOCAL_D / "options.inc").read_text(), re.MULTILINE)
    assert url_tld == f"/etc/rspamd/{IMAGE_TLD.name}"
    assert f'args[1] or "{url_tld}"' in WARM_TLD.read_text()


def test_the_drop_in_runs_the_image_scripts() -> None:
    text = DROP_IN.read_text()
    for script in (WARM_TLD, HS_HELPER_EXIT):
        assert f"/etc/rspamd/{script.name}" in text
        assert script.exists()
    assert os.access(HS_HELPER_EXIT, os.X_OK)
    require_program("sh")
    subprocess.run(["sh", "-n", str(HS_HELPER_EXIT)], check=True)


def test_systemd_reads_the_drop_in(tmp_path: Path) -> None:
    """systemd-analyze verify over Debian's rspamd.service with the image's drop-in next to it."""
    require_program("systemd-analyze")
    require_program("rspamd")
    unit = Path("/lib/systemd/system/rspamd.service")  # Debian's rspamd package
    shutil.copy(unit, tmp_path / unit.name)
    (tmp_path / "rspamd.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "rspamd.service.d" / DROP_IN.name)
    (tmp_path / "rspamd.service.d" / "zz-broken.conf").write_text("[Service]\nExecStartPost=not/absolute\n")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    # The deliberately broken drop-in proves systemd-analyze reads this directory's drop-ins at all.
    broken = subprocess.run(["systemd-analyze", "verify", "rspamd.service"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert "zz-broken.conf" in broken.stderr
    (tmp_path / "rspamd.service.d" / "zz-broken.conf").unlink()
    verified = subprocess.run(["systemd-analyze", "verify", "rspamd.service"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    assert verified.returncode == 0, verified.stderr
    assert "letterbox.conf" not in verified.stderr


def test_the_language_links_reach_debians_files() -> None:
    """letterbox-languages/ (rspamd.conf.local's lang_detection.languages) holds links to Debian's
    language files: a new rspamd package that moved or renamed them fails this, not a box (rspamd would
    start with no language at all)."""
    require_program("rspamd")
    assert f'languages = "/etc/rspamd/{IMAGE_LANGUAGES.name}";' in IMAGE_CONF_LOCAL.read_text()
    names = sorted(path.name for path in IMAGE_LANGUAGES.iterdir())
    assert names == ["ar.json", "de.json", "en.json", "es.json", "fr.json", "it.json", "nl.json", "pl.json",
                     "pt.json", "ru.json", "stop_words"]
    for path in IMAGE_LANGUAGES.iterdir():
        assert path.is_symlink(), path
        assert Path(os.readlink(path)).parent == Path("/usr/share/rspamd/languages"), path
        assert path.resolve().is_file(), path


def test_rspamd_loads_only_the_linked_languages(tmp_path: Path) -> None:
    """rspamd's own configuration check with the image's rspamd.conf.local: its language detector loads
    the ten linked languages, not Debian's 46 (about 35 MB of RSS summed over rspamd's processes)."""
    require_program("rspamadm")
    write_conf_local(tmp_path)
    (tmp_path / "db").mkdir()
    checked = subprocess.run(["rspamadm", "-v", f"--var=LOCAL_CONFDIR={tmp_path}", f"--var=DBDIR={tmp_path / 'db'}",
                              "configtest", "-c", "/etc/rspamd/rspamd.conf"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    loaded = re.findall(r"loaded (\d+) languages", checked.stdout + checked.stderr)
    assert loaded == ["10"], (checked.stdout + checked.stderr)[-3000:]


def test_rspamd_runs_without_hyperscan_and_a_reload_restarts_it() -> None:
    """The box runs rspamd's regular expressions on PCRE2, gives the hs_helper rspamd forks anyway a
    cache directory that cannot exist (it compiles nothing), removes the databases an earlier image
    compiled before rspamd starts, and turns `systemctl reload rspamd` into a restart: ExecReload ends
    rspamd and Debian's unit's Restart=always starts it again (rspamd's own SIGHUP reload runs a second
    controller beside the first for a moment). tests/integration/test_spam_content.py runs it."""
    require_program("rspamd")
    assert re.search(r"^disable_hyperscan = true;$", (IMAGE_LOCAL_D / "options.inc").read_text(), re.MULTILINE)
    [section] = re.findall(r'^worker "hs_helper" \{(.*?)^\}', IMAGE_CONF_LOCAL.read_text(), re.MULTILINE | re.DOTALL)
    assert 'cache_dir = "/dev/null/' in section
    unit = Path("/lib/systemd/system/rspamd.service").read_text()  # Debian's rspamd package
    assert re.search(r"^Restart=always$", unit, re.MULTILINE)
    drop_in = DROP_IN.read_text()
    assert re.findall(r"^ExecReload=.*$", drop_in, re.MULTILINE) == ["ExecReload=", "ExecReload=/bin/kill -TERM $MAINPID"]
    assert "-name *.hs -o -name *.hs.unser" in drop_in
