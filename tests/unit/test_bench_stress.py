"""bench.stress's summary (issue 19): the rounds of each checkout against the first's of the same
round, next to the medians, so an A/B on a loaded machine is judged by how many rounds went which way."""

from __future__ import annotations

from bench.stress import summary


def run(cpu: float, commands: int = 1000, fetches: float = 100.0) -> dict[str, float]:
    return {"fetches/s": fetches, "server cpu s": cpu, "cmd Fetc": commands / 2, "cmd Stor": commands / 2}


def test_each_checkout_after_the_first_is_compared_round_by_round() -> None:
    lines = summary({
        "main": [run(1.0), run(1.2), run(0.9)],
        "branch": [run(0.9), run(1.26), run(0.855)],  # lower, higher, lower
    })
    assert lines[0] == ("main: fetches/s median 100.0 (100, 100, 100); server CPU ms per fetch 2.00,"
                        " per command 1.00 (1.000, 1.200, 0.900)")
    assert lines[1].startswith("branch: fetches/s median 100.0 (100, 100, 100);")
    assert lines[1].endswith("per command 0.90 (0.900, 1.260, 0.855)")
    assert lines[2] == "  against the first, round by round: CPU per command x0.950 (median of 3; lower in 2, higher in 1)"
    assert len(lines) == 3


def test_one_checkout_has_only_its_medians() -> None:
    assert summary({"this": [run(0.5)]}) == [
        "this: fetches/s median 100.0 (100); server CPU ms per fetch 1.00, per command 0.50 (0.500)"]
