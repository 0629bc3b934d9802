"""Charts as inline SVG strings: lines, horizontal stacked bars, a labelled scatter, a heat map.

Why hand-written SVG and not a chart library inlined into the page: the pages need five simple
chart kinds (lines, stacked bars, a scatter, intervals, a heat map); a library that draws them
would be most of the bytes of every file (a whole page is 15-45 KB) and would need JavaScript to
show anything, where an SVG is drawn by the browser, a printer or a mail preview as it is. Colours are CSS classes
(``s0`` ... ``s7``, ``good``, ``bad``) resolved by the page's stylesheet, so dark mode follows;
every mark carries a ``<title>``, which the browser shows on hover.

Each function returns an ``<figure>`` (chart, legend, caption). Coordinates are in a fixed
``viewBox`` and the SVG scales to the width of its container.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tightfit.report.page import escape

# viewBox widths: a chart in half a page, and one across it (text keeps about the same size)
WIDTH, WIDE, HEIGHT = 520, 1000, 260
LEFT, RIGHT, TOP, BOTTOM = 78, 28, 14, 38


@dataclass
class Series:
    """One line of a line chart: ``points`` are ``(x, y)``; ``style`` is a CSS class (``s0`` ...)."""

    name: str
    points: list[tuple[float, float]]
    style: str = "s0"
    dashed: bool = False


@dataclass
class Limit:
    """A horizontal line across a chart (a budget, a predicted peak) with its label."""

    name: str
    value: float
    style: str = "bad"


@dataclass
class Point:
    """One mark of a scatter: a labelled point, ringed when ``best``."""

    label: str
    x: float
    y: float
    style: str = "s0"
    best: bool = False
    title: str = ""


@dataclass
class Axis:
    """How an axis is labelled: its title, a tick formatter, whether it is logarithmic, and the
    unit ticks are round in (``scale``: 2**30 puts ticks on round GiB)."""

    title: str = ""
    format: Callable[[float], str] = field(default=lambda value: f"{value:g}")
    log: bool = False
    scale: float = 1.0
    from_zero: bool = False
    exact: Callable[[float], str] | None = None  # how one value prints (limits, hover text); default: format

    def value(self, number: float) -> str:
        return (self.exact or self.format)(number)


def bytes_axis(title: str, largest: float, *, from_zero: bool = True) -> Axis:
    """An axis of byte counts with ticks on round KiB, MiB or GiB, whichever suits ``largest``."""
    scale, unit = next(
        (
            (2.0**power, unit)
            for power, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))
            if largest >= 2.0**power
        ),
        (1.0, "B"),
    )
    from tightfit.units import format_bytes

    return Axis(title, lambda value: f"{value / scale:g} {unit}", scale=scale, from_zero=from_zero, exact=format_bytes)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (steps of 1, 2 or 5 x 10^n)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(multiple * magnitude for multiple in (1, 2, 2.5, 5, 10) if multiple * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _scaled_ticks(bounds: tuple[float, float], scale: float) -> list[float]:
    return [tick * scale for tick in nice_ticks(bounds[0] / scale, bounds[1] / scale)]


def _log_ticks(low: float, high: float) -> list[float]:
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return [10.0**power for power in range(first, last + 1)]


class _Frame:
    """Maps data to the plot area and draws the axes, grid and tick labels."""

    def __init__(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        x_axis: Axis,
        y_axis: Axis,
        width: int = WIDTH,
        height: int = HEIGHT,
    ):
        self.width, self.height = width, height
        self.x_axis, self.y_axis = x_axis, y_axis
        self.x_ticks = _log_ticks(*x_range) if x_axis.log else _scaled_ticks(x_range, x_axis.scale)
        self.y_ticks = _log_ticks(*y_range) if y_axis.log else _scaled_ticks(y_range, y_axis.scale)
        self.x_low, self.x_high = self.x_ticks[0], self.x_ticks[-1]
        self.y_low, self.y_high = self.y_ticks[0], self.y_ticks[-1]

    def _scale(self, value: float, low: float, high: float, log: bool) -> float:
        if log:
            value, low, high = (math.log10(max(v, 1e-300)) for v in (value, low, high))
        return 0.5 if high == low else (value - low) / (high - low)

    def x(self, value: float) -> float:
        return LEFT + self._scale(value, self.x_low, self.x_high, self.x_axis.log) * (self.width - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return (
            self.height
            - BOTTOM
            - self._scale(value, self.y_low, self.y_high, self.y_axis.log) * (self.height - TOP - BOTTOM)
        )

    def axes(self) -> str:
        parts = []
        for tick in self.y_ticks:
            y = self.y(tick)
            parts.append(f'<line class="grid" x1="{LEFT}" x2="{self.width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(self.y_axis.format(tick))}</text>'
            )
        for tick in self.x_ticks:
            x = self.x(tick)
            parts.append(
                f'<text x="{x:.1f}" y="{self.height - BOTTOM + 15}" '
                f'text-anchor="middle">{escape(self.x_axis.format(tick))}</text>'
            )
        bottom = self.height - BOTTOM
        parts.append(f'<line class="axis" x1="{LEFT}" x2="{self.width - RIGHT}" y1="{bottom}" y2="{bottom}"/>')
        parts.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}"/>')
        if self.x_axis.title:
            parts.append(
                f'<text class="label" x="{(LEFT + self.width - RIGHT) / 2:.0f}" y="{self.height - 4}" '
                f'text-anchor="middle">{escape(self.x_axis.title)}</text>'
            )
        if self.y_axis.title:
            parts.append(
                f'<text class="label" transform="translate(11 {(TOP + bottom) / 2:.0f}) rotate(-90)" '
                f'text-anchor="middle">{escape(self.y_axis.title)}</text>'
            )
        return "".join(parts)


def _svg(body: str, label: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


def _figure(svg: str, legend: Sequence[tuple[str, str, bool]] = (), caption: str = "") -> str:
    """``legend``: ``(name, style, dashed)`` per entry."""
    legend_html = ""
    if legend:
        dash = ' stroke-dasharray="5 3"'
        entries = "".join(
            f'<span><svg width="22" height="10" class="chart" style="display:inline;width:22px">'
            f'<line class="{style}" x1="1" x2="21" y1="5" y2="5" stroke-width="3"'
            f"{dash if dashed else ''}/></svg> {escape(name)}</span>"
            for name, style, dashed in legend
        )
        legend_html = f'<div class="legend">{entries}</div>'
    caption_html = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{svg}{legend_html}{caption_html}</figure>"


def line_chart(
    series: Sequence[Series],
    *,
    x_axis: Axis,
    y_axis: Axis,
    limits: Sequence[Limit] = (),
    caption: str = "",
    label: str = "line chart",
    width: int = WIDTH,
) -> str:
    """Lines over a shared x axis, with optional horizontal limits (a budget, a predicted peak).

    Series with no points are left out; with nothing to draw, a sentence says so.
    """
    series = [line for line in series if line.points]
    if not series:
        return f'<p class="note">No data for {escape(label)}.</p>'
    xs = [x for line in series for x, _ in line.points]
    ys = [y for line in series for _, y in line.points if math.isfinite(y)] + [limit.value for limit in limits]
    if y_axis.log:
        ys = [y for y in ys if y > 0] or [1.0]
    low = min(ys)
    if not y_axis.log and low >= 0 and (y_axis.from_zero or low < 0.35 * max(ys)):
        low = 0.0
    frame = _Frame((min(xs), max(xs)), (low, max(ys)), x_axis, y_axis, width=width)
    parts = [frame.axes()]
    for limit in limits:
        y = frame.y(limit.value)
        parts.append(
            f'<line class="limit {limit.style}" x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}">'
            f"<title>{escape(limit.name)}: {escape(y_axis.value(limit.value))}</title></line>"
        )
        parts.append(
            f'<text class="{limit.style}" x="{width - RIGHT - 4}" y="{y - 5:.1f}" text-anchor="end">'
            f"{escape(limit.name)} {escape(y_axis.value(limit.value))}</text>"
        )
    for line in series:
        finite = [(x, y) for x, y in line.points if math.isfinite(y) and (y > 0 or not y_axis.log)]
        path = " ".join(
            f"{'M' if index == 0 else 'L'}{frame.x(x):.1f},{frame.y(y):.1f}" for index, (x, y) in enumerate(finite)
        )
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        parts.append(f'<path class="line {line.style}" d="{path}"{dash}><title>{escape(line.name)}</title></path>')
        if len(finite) <= 40:  # dots where they can be told apart
            parts.extend(
                f'<circle class="{line.style}" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.5">'
                f"<title>{escape(line.name)} at {escape(x_axis.value(x))}: {escape(y_axis.value(y))}</title></circle>"
                for x, y in finite
            )
    legend = [(line.name, line.style, line.dashed) for line in series] + [
        (limit.name, limit.style, True) for limit in limits
    ]
    return _figure(_svg("".join(parts), label, width), legend if len(legend) > 1 else (), caption)


def stacked_bars(
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]],
    *,
    limits: Sequence[Limit] = (),
    format_value: Callable[[float], str] = lambda value: f"{value:g}",
    axis: Axis | None = None,
    caption: str = "",
    label: str = "stacked bars",
    width: int = WIDE,
) -> str:
    """One horizontal bar per row, split into segments, against vertical limits.

    Args:
        rows: ``(row label, [(segment name, value), ...])``; segment names share colours across rows.
        limits: vertical lines (the usable memory, the memory left after the margin).
        format_value: how values print (bytes, seconds).
        axis: how the ticks are placed and labelled (default: round numbers in ``format_value``).
    """
    names: list[str] = []
    for _, segments in rows:
        for name, _ in segments:
            if name not in names:
                names.append(name)
    styles = {name: f"s{index % 8}" for index, name in enumerate(names)}
    label_width = min(220, 24 + 7 * max((len(row_label) for row_label, _ in rows), default=4))
    bar_height, gap = 22, 12
    height = TOP + len(rows) * (bar_height + gap) + BOTTOM
    highest = max(
        [sum(value for _, value in segments) for _, segments in rows] + [limit.value for limit in limits] + [1]
    )
    axis = axis or Axis(format=format_value)
    ticks = _scaled_ticks((0, highest), axis.scale)
    scale_high = ticks[-1]
    plot_width = width - label_width - RIGHT - 70  # room for the total after the bar

    def x_of(value: float) -> float:
        return label_width + value / scale_high * plot_width

    parts = []
    for tick in ticks:
        x = x_of(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - BOTTOM + 15}" text-anchor="middle">{escape(axis.format(tick))}</text>'
        )
    for index, (row_label, segments) in enumerate(rows):
        y = TOP + index * (bar_height + gap)
        parts.append(
            f'<text class="label" x="{label_width - 8}" y="{y + bar_height / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(row_label)}</text>'
        )
        start = 0.0
        for name, value in segments:
            if value <= 0:
                continue
            x0, x1 = x_of(start), x_of(start + value)
            parts.append(
                f'<rect class="{styles[name]}" x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 0.5):.1f}" '
                f'height="{bar_height}">'
                f"<title>{escape(row_label)}: {escape(name)} {escape(format_value(value))}</title></rect>"
            )
            start += value
        parts.append(
            f'<text x="{x_of(start) + 5:.1f}" y="{y + bar_height / 2 + 4:.1f}">{escape(format_value(start))}</text>'
        )
    for limit in limits:
        x = x_of(limit.value)
        parts.append(
            f'<line class="limit {limit.style}" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP - 6}" y2="{height - BOTTOM}">'
            f"<title>{escape(limit.name)}: {escape(format_value(limit.value))}</title></line>"
        )
    legend = [(name, styles[name], False) for name in names] + [
        (f"{limit.name} {format_value(limit.value)}", limit.style, True) for limit in limits
    ]
    return _figure(_svg("".join(parts), label, width, height), legend, caption)


def scatter(points: Sequence[Point], *, x_axis: Axis, y_axis: Axis, caption: str = "", label: str = "scatter") -> str:
    """Labelled points; the ``best`` one ringed."""
    if not points:
        return f'<p class="note">No data for {escape(label)}.</p>'
    xs, ys = [point.x for point in points], [point.y for point in points]
    x_low, x_high = min(xs), max(xs)
    if not x_axis.log:  # room on both sides for the labels
        pad = (x_high - x_low) * 0.08 or abs(x_high) * 0.1 or 1
        x_low, x_high = max(0.0, x_low - pad) if x_low >= 0 else x_low - pad, x_high + pad
    y_pad = (max(ys) - min(ys)) * 0.15 or abs(max(ys)) * 0.01 or 1
    frame = _Frame((x_low, x_high), (min(ys) - y_pad, max(ys) + y_pad), x_axis, y_axis)
    parts = [frame.axes()]
    placed: list[tuple[float, float, float]] = []  # (left, right, baseline) of the labels drawn so far
    for point in sorted(points, key=lambda point: point.x):
        x, y = frame.x(point.x), frame.y(point.y)
        title = point.title or f"{point.label}: {x_axis.value(point.x)}, {y_axis.value(point.y)}"
        if point.best:
            parts.append(f'<circle class="best" cx="{x:.1f}" cy="{y:.1f}" r="10"/>')
        parts.append(
            f'<circle class="{point.style}" cx="{x:.1f}" cy="{y:.1f}" r="5"><title>{escape(title)}</title></circle>'
        )
        anchor, dx = ("end", -9) if x > WIDTH * 0.7 else ("start", 9)
        weight = ' font-weight="700"' if point.best else ""
        label_y = _free_label_row(placed, x + dx, anchor, y, len(point.label))
        parts.append(
            f'<text class="label" x="{x + dx:.1f}" y="{label_y:.1f}" '
            f'text-anchor="{anchor}"{weight}>{escape(point.label)}</text>'
        )
    return _figure(_svg("".join(parts), label), (), caption)


def _free_label_row(
    placed: list[tuple[float, float, float]], x: float, anchor: str, y: float, characters: int
) -> float:
    """A baseline near ``y`` where a label of ``characters`` does not overlap those ``placed``
    (points with the same metric would otherwise print their names over each other)."""
    width = 6.3 * characters
    left, right = (x - width, x) if anchor == "end" else (x, x + width)
    for offset in (-7, 17, -21, 31, -35, 45, -49, 59):
        baseline = y + offset
        if all(
            right < other_left or left > other_right or abs(baseline - other_y) >= 13
            for other_left, other_right, other_y in placed
        ):
            break
    placed.append((left, right, baseline))
    return baseline


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    format_value: Callable[[float], str] = lambda value: f"{value:g}",
    highlight: Callable[[float], bool] | None = None,
    caption: str = "",
    label: str = "heat map",
    row_title: str = "",
    column_title: str = "",
) -> str:
    """A grid of shaded cells with their values; darker is larger (per matrix). ``highlight``
    picks cells drawn in the ``good`` colour instead (significant p-values)."""
    values = [value for row in matrix for value in row if value is not None]
    top = max(values, default=1) or 1
    cell = max(34 if len(column_labels) > 6 else 48, 8 + 7 * max((len(text) for text in column_labels), default=1))
    label_width = min(180, 20 + 7 * max((len(text) for text in row_labels), default=2))
    head = 22 + (14 if column_title else 0)
    width = label_width + cell * len(column_labels) + 8
    height = head + cell * len(row_labels) + 8
    parts = []
    if column_title:
        parts.append(
            f'<text class="label" x="{label_width + cell * len(column_labels) / 2:.0f}" y="12" '
            f'text-anchor="middle">{escape(column_title)}</text>'
        )
    for column, text in enumerate(column_labels):
        parts.append(
            f'<text x="{label_width + cell * (column + 0.5):.1f}" y="{head - 6}" '
            f'text-anchor="middle">{escape(text)}</text>'
        )
    for row, text in enumerate(row_labels):
        y = head + cell * row
        parts.append(
            f'<text class="label" x="{label_width - 6}" y="{y + cell / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(text)}</text>'
        )
        for column, value in enumerate(matrix[row]):
            x = label_width + cell * column
            if value is None:
                parts.append(
                    f'<rect class="muted" x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" opacity="0.08"/>'
                )
                continue
            style = "good" if highlight is not None and highlight(value) else "s0"
            if highlight is None:
                opacity = 0.12 + 0.78 * value / top
            else:  # a test: the cells that pass stand out, the others recede
                opacity = 0.7 if style == "good" else 0.22
            parts.append(
                f'<rect class="{style}" x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" opacity="{opacity:.2f}">'
                f"<title>{escape(row_labels[row])} / {escape(column_labels[column])}: "
                f"{escape(format_value(value))}</title></rect>"
            )
            parts.append(
                f'<text class="label" x="{x + (cell - 2) / 2:.1f}" y="{y + cell / 2 + 3:.1f}" '
                f'text-anchor="middle">{escape(format_value(value))}</text>'
            )
    if row_title:
        parts.append(f'<text x="4" y="{head - 6}">{escape(row_title)}</text>')
    svg = (
        f'<svg class="chart" viewBox="0 0 {width} {height}" style="max-width:{width * 1.3:.0f}px" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )
    return _figure(svg, (), caption)


def intervals(
    rows: Sequence[tuple[str, float, float | None, float | None]],
    *,
    axis: Axis,
    best: str | None = None,
    caption: str = "",
    label: str = "intervals",
    width: int = WIDE,
) -> str:
    """A forest plot: one row per ``(label, value, low, high)``, the value as a dot and its
    confidence interval as a bar; the ``best`` row in the ``good`` colour."""
    if not rows:
        return f'<p class="note">No data for {escape(label)}.</p>'
    values = [value for _, value, low, high in rows for value in (value, low, high) if value is not None]
    ticks = nice_ticks(min(values), max(values))
    label_width = min(260, 24 + 7 * max(len(name) for name, *_ in rows))
    row_height = 24
    height = TOP + row_height * len(rows) + BOTTOM
    plot_width = width - label_width - RIGHT - 60

    def x_of(value: float) -> float:
        return label_width + (value - ticks[0]) / ((ticks[-1] - ticks[0]) or 1) * plot_width

    parts = []
    for tick in ticks:
        x = x_of(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{height - BOTTOM}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - BOTTOM + 15}" text-anchor="middle">{escape(axis.format(tick))}</text>'
        )
    if axis.title:
        parts.append(
            f'<text class="label" x="{label_width + plot_width / 2:.0f}" y="{height - 4}" '
            f'text-anchor="middle">{escape(axis.title)}</text>'
        )
    for index, (name, value, low, high) in enumerate(rows):
        y = TOP + row_height * index + row_height / 2
        style = "good" if name == best else "s0"
        weight = ' font-weight="700"' if name == best else ""
        parts.append(
            f'<text class="label" x="{label_width - 8}" y="{y + 4:.1f}" text-anchor="end"{weight}>{escape(name)}</text>'
        )
        if low is not None and high is not None:
            parts.append(
                f'<line class="{style}" x1="{x_of(low):.1f}" x2="{x_of(high):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                'stroke-width="3" opacity="0.55"/>'
            )
        interval = f" [{axis.value(low)}, {axis.value(high)}]" if low is not None and high is not None else ""
        parts.append(
            f'<circle class="{style}" cx="{x_of(value):.1f}" cy="{y:.1f}" r="5"><title>{escape(name)}: '
            f"{escape(axis.value(value))}{escape(interval)}</title></circle>"
        )
        parts.append(f'<text x="{width - RIGHT}" y="{y + 4:.1f}" text-anchor="end">{escape(axis.value(value))}</text>')
    return _figure(_svg("".join(parts), label, width, height), (), caption)
