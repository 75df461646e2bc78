"""web/charts.py: server-made SVG, escaped, readable without JavaScript."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

from web import charts

DAYS = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(30)]


def test_bars_for_30_days_stack_each_kind() -> None:
    rows = [(day, {"in": i, "out": 2, "junk": 1 if i % 3 == 0 else 0, "rejected": 5}) for i, day in enumerate(DAYS)]
    svg = str(charts.bars("Messages per day", rows, ("in", "out", "junk", "rejected")))
    root = ET.fromstring(svg.split('<p class="chart-legend">')[0])  # well-formed XML
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == sum(1 for _, c in rows for k in ("in", "out", "junk", "rejected") if c[k])
    assert "2026-11-30: 29 received" in svg
    assert "rejected or bounced" in svg
    assert ">50<" in svg  # 29 + 2 + 1 + 5 = 37 at most: the axis tops at a round 50


def test_line_and_empty_and_escaping() -> None:
    points = [(DAYS[0], 1.5), (DAYS[7], 1.75), (DAYS[29], 2.25)]
    svg = str(charts.line("Disk used", points, " GiB"))
    ET.fromstring(svg)
    assert "2026-11-30: 2.25 GiB" in svg
    assert "no data yet" in str(charts.line("Disk", [], " GiB"))
    assert "&lt;script&gt;" in str(charts.bars("<script>", [(DAYS[0], {"in": 1})], ("in",)))
    empty = str(charts.bars("Nothing", [(d, {}) for d in DAYS], ("in",)))
    assert empty.split('<p class="chart-legend">')[0].count("<rect") == 0  # the legend's swatch is the one rect
