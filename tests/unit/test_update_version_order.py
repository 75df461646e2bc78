"""Which bundle counts as newer than the running version (letterbox-update and the console's Updates
page refuse an older one unless asked): PEP 440's order, not only plain numbers."""

from __future__ import annotations

import pytest

from appliance.update import is_newer


@pytest.mark.parametrize(("candidate", "running", "newer"), [
    ("1.0.1", "1.0.0", True),
    ("1.10.0", "1.9.0", True),
    ("1.0.0", "1.0.1", False),
    ("1.0", "1.0.0", False),  # the same version, spelled shorter
    # Any version that was not plain numbers passed as newer: a release candidate of an older
    # version went in without --allow-downgrade.
    ("1.0.0rc1", "1.0.1", False),
    ("1.0.1rc1", "1.0.0", True),
    ("1.0.0", "1.0.0rc1", True),
    ("1.0.0rc1", "1.0.0", False),
    ("1.0.0.dev3", "1.0.0a1", False),
    ("1.0.0b2", "1.0.0b1", True),
    ("1.0.0.post1", "1.0.0", True),
    ("0.9.0+local", "1.0.0", False),
    ("1.0.0+other", "1.0.0+mine", True),  # the same release built apart: either may replace the other
    ("weird", "1.0.0", True),  # no order known: allowed, as before
])
def test_newer_follows_pep440(candidate: str, running: str, newer: bool) -> None:
    assert is_newer(candidate, running) is newer


@pytest.mark.parametrize(("candidate", "running", "newer"), [
    ("1.0rc1.dev2", "1.0rc1", False),  # a dev release of the candidate comes before it
    ("1.0rc1", "1.0rc1.dev2", True),
    ("1.0rc1.dev2", "1.1", False),  # was unordered: any order allowed, a downgrade too
    ("1!0.1", "2.0", True),  # an epoch outranks the release numbers
    ("2.0", "1!0.1", False),
    ("1.0.post1.dev1", "1.0", True),
])
def test_every_pep440_version_is_ordered(candidate: str, running: str, newer: bool) -> None:
    assert is_newer(candidate, running) is newer
