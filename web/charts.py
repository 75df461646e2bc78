"""Charts as inline SVG made on the server: readable at a glance and on a phone, no JavaScript.

`bars` draws stacked bars, one per day; `line` draws one value over days. Every text is escaped; the
markup is ours, so the templates mark it safe."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 600, 180
LEFT, BOTTOM, TOP = 64, 22, 10
COLORS = {"in": "#2f7d4f", "out": "#2f5f9e", "junk": "#c99a1a", "rejected": "#b23b3b", "used": "#2f5f9e"}
LABELS = {"in": "received", "out": "sent", "junk": "junk", "rejected": "rejected or bounced"}


def _nice_max(value: float) -> float:
    """A round top for the axis: 1, 2, 5 × 10^n at or above `value`."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for factor in (1, 2, 5, 10):
        if value <= step * factor:
            return step * factor
    return step * 10


def _frame(title: str, top: float, unit: str) -> list[str]:
    plot_h = HEIGHT - BOTTOM - TOP
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for fraction in (0, 0.5, 1):
        y = TOP + plot_h * (1 - fraction)
        label = f"{top * fraction:g}{unit}"
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH}" y1="{y:.1f}" y2="{y:.1f}" class="grid" stroke="#ddd"/>'
                     f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{escape(label)}</text>')
    return parts


def _day_labels(days: Sequence[dt.date], x_of: list[float]) -> list[str]:
    parts = []
    for i in range(0, len(days), max(1, len(days) // 5)):
        parts.append(f'<text x="{x_of[i]:.1f}" y="{HEIGHT - 6}" font-size="11">{days[i].strftime("%d %b")}</text>')
    return parts


def bars(title: str, rows: Sequence[tuple[dt.date, Mapping[str, int]]], kinds: Sequence[str]) -> Markup:
    """Stacked bars of counts per day, with a legend."""
    top = _nice_max(max((sum(counts.get(k, 0) for k in kinds) for _, counts in rows), default=0))
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(len(rows), 1)
    parts = _frame(title, top, "")
    x_of = [LEFT + i * slot for i in range(len(rows))]
    for (day, counts), x in zip(rows, x_of, strict=True):
        base = float(TOP + plot_h)
        for kind in kinds:
            n = counts.get(kind, 0)
            if not n:
                continue
            h = plot_h * n / top
            base -= h
            parts.append(f'<rect x="{x + 1:.1f}" y="{base:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}" '
                         f'fill="{COLORS.get(kind, "#777")}"><title>{day.isoformat()}: {n} '
                         f'{escape(LABELS.get(kind, kind))}</title></rect>')
    parts += _day_labels([d for d, _ in rows], x_of)
    parts.append("</svg>")
    # Swatches as SVG, not inline styles: the console's Content-Security-Policy allows no style attributes.
    legend = "".join(f'<span class="legend"><svg width="12" height="12" aria-hidden="true"><rect width="12" '
                     f'height="12" fill="{COLORS.get(k, "#777")}"/></svg> {escape(LABELS.get(k, k))}</span>'
                     for k in kinds)
    return Markup("".join(parts) + f'<p class="chart-legend">{legend}</p>')  # noqa: S704  our markup, texts escaped


def line(title: str, points: Sequence[tuple[dt.date, float]], unit: str) -> Markup:
    """One value per day (gaps where a day has none), e.g. disk use in GiB."""
    if not points:
        return Markup(f'<p class="hint">{escape(title)}: no data yet.</p>')  # noqa: S704  escaped
    first, last = points[0][0], points[-1][0]
    span = max((last - first).days, 1)
    top = _nice_max(max(v for _, v in points))
    plot_w, plot_h = WIDTH - LEFT - 10, HEIGHT - BOTTOM - TOP
    xy = [(LEFT + plot_w * (d - first).days / span, TOP + plot_h * (1 - v / top)) for d, v in points]
    parts = _frame(title, top, unit)
    parts.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
        COLORS["used"], " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)))
    parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLORS["used"]}"><title>{d.isoformat()}: '
              f'{v:g}{escape(unit)}</title></circle>' for (x, y), (d, v) in zip(xy, points, strict=True)]
    parts += _day_labels([d for d, _ in points], [x for x, _ in xy])
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  our markup, texts escaped
