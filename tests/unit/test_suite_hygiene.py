"""The test suite itself: a run leaves the checkout as it found it (a fresh clone's CI, and a developer's
`git status`, see nothing the tests wrote)."""

from __future__ import annotations

from hypothesis.configuration import storage_directory

from tests.conftest import REPO


def test_hypothesis_keeps_its_files_out_of_the_checkout() -> None:
    # Its example database and its cache of the tested modules' constants; both under ./.hypothesis by default.
    for name in ("examples", "constants"):
        path = storage_directory(name, intent_to_write=False).path
        assert not path.resolve().is_relative_to(REPO), path
