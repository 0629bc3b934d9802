"""The page shell every report shares: one self-contained HTML document, its CSS and its script.

Nothing is fetched: no CDN, no web fonts (the system's UI font), charts are inline SVG
(:mod:`tightfit.report.charts`). Light and dark follow ``prefers-color-scheme``; tables marked
sortable sort on a click of their header (a dozen lines of inline script); ``@media print`` drops
the colours that waste ink and keeps sections whole.

A page is built from small pieces that each return an HTML string: :func:`verdict` (the coloured
banner with the key figures, what a reader sees first), :func:`section`, :func:`table`,
:func:`facts`, and :func:`document` assembles them.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime

from tightfit import __version__

# tone -> what the banner and badges mean; "info" is for pages without a pass/fail answer
TONES = ("good", "warn", "bad", "info")

CSS = """
:root { color-scheme: light dark;
  --bg:#fbfbfc; --fg:#1d2126; --muted:#5d6670; --line:#d9dde2; --card:#ffffff; --head:#f0f2f5;
  --good:#1a7f37; --good-bg:#e6f4ea; --warn:#9a6700; --warn-bg:#fff4d6; --bad:#c62828; --bad-bg:#fde8e8;
  --info:#2457a6; --info-bg:#e8effa;
  --c0:#2563eb; --c1:#ea580c; --c2:#16a34a; --c3:#9333ea; --c4:#0891b2; --c5:#db2777; --c6:#65a30d; --c7:#78716c; }
@media (prefers-color-scheme: dark) { :root {
  --bg:#15181c; --fg:#e6e8eb; --muted:#9aa4ae; --line:#353b42; --card:#1d2126; --head:#252a30;
  --good:#4ade80; --good-bg:#14301f; --warn:#fbbf24; --warn-bg:#3a2f12; --bad:#f87171; --bad-bg:#3d1a1a;
  --info:#7aa7f0; --info-bg:#1a2740;
  --c0:#60a5fa; --c1:#fb923c; --c2:#4ade80; --c3:#c084fc; --c4:#22d3ee; --c5:#f472b6; --c6:#a3e635; --c7:#a8a29e; } }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 20px 48px; }
header.top { display:flex; justify-content:space-between; align-items:baseline; gap:12px; flex-wrap:wrap; }
header.top h1 { font-size: 1.35rem; margin: 0; }
header.top .kind { color: var(--muted); font-size: .9rem; }
.verdict { border-radius: 10px; padding: 16px 20px; margin: 14px 0 18px; border: 1px solid var(--line); }
.verdict .headline { font-size: 1.6rem; font-weight: 700; letter-spacing: -.01em; }
.verdict .why { margin-top: 4px; }
.verdict.good { background: var(--good-bg); } .verdict.good .headline { color: var(--good); }
.verdict.warn { background: var(--warn-bg); } .verdict.warn .headline { color: var(--warn); }
.verdict.bad { background: var(--bad-bg); } .verdict.bad .headline { color: var(--bad); }
.verdict.info { background: var(--info-bg); } .verdict.info .headline { color: var(--info); }
.tiles { display:grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; margin-top: 14px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.tile .label { color: var(--muted); font-size: .8rem; }
.tile .value { font-size: 1.3rem; font-weight: 650; font-variant-numeric: tabular-nums; }
.tile .value.text { font-size: 1rem; overflow-wrap: anywhere; }
.tile .sub { color: var(--muted); font-size: .8rem; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 18px;
  margin: 14px 0; break-inside: avoid; }
section h2 { font-size: 1.05rem; margin: 0 0 8px; }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 14px; }
.grid2 > section { margin: 0; }
.note, figcaption { color: var(--muted); font-size: .85rem; }
figure { margin: 0; }
table { border-collapse: collapse; width: 100%; font-size: .88rem; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td:first-child { min-width: 9em; }
td.num, th.num { text-align: right; white-space: nowrap; }
.table-wrap { overflow-x: auto; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: var(--muted); font-size: .75em; }
table.sortable th[aria-sort=ascending]::after { content: " \\2191"; }
table.sortable th[aria-sort=descending]::after { content: " \\2193"; }
tr.best td { background: var(--good-bg); font-weight: 600; }
tr.flagged td { background: var(--bad-bg); }
.badge { display:inline-block; padding: 1px 8px; border-radius: 999px; font-size: .8rem; font-weight: 600;
  white-space: nowrap; }
.badge.good { background: var(--good-bg); color: var(--good); }
.badge.warn { background: var(--warn-bg); color: var(--warn); }
.badge.bad { background: var(--bad-bg); color: var(--bad); }
.badge.info { background: var(--info-bg); color: var(--info); }
dl.facts { display:grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; font-size: .88rem; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
ul.lines { margin: 0; padding-left: 1.1em; } ul.lines li { margin: 2px 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .82rem; }
pre { background: var(--head); padding: 8px 10px; border-radius: 6px; overflow-x: auto; margin: 0; }
details summary { cursor: pointer; color: var(--muted); }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { fill: var(--muted); font: 11px system-ui, sans-serif; }
svg.chart text.label { fill: var(--fg); }
svg.chart .axis { stroke: var(--line); } svg.chart .grid { stroke: var(--line); stroke-dasharray: 2 3; }
svg.chart .s0 { stroke: var(--c0); fill: var(--c0); } svg.chart .s1 { stroke: var(--c1); fill: var(--c1); }
svg.chart .s2 { stroke: var(--c2); fill: var(--c2); } svg.chart .s3 { stroke: var(--c3); fill: var(--c3); }
svg.chart .s4 { stroke: var(--c4); fill: var(--c4); } svg.chart .s5 { stroke: var(--c5); fill: var(--c5); }
svg.chart .s6 { stroke: var(--c6); fill: var(--c6); } svg.chart .s7 { stroke: var(--c7); fill: var(--c7); }
svg.chart .good { stroke: var(--good); fill: var(--good); } svg.chart .warn { stroke: var(--warn); fill: var(--warn); }
svg.chart .bad { stroke: var(--bad); fill: var(--bad); } svg.chart .muted { stroke: var(--muted); fill: var(--muted); }
svg.chart path.line { fill: none; stroke-width: 2; } svg.chart line.limit { stroke-width: 1.5; stroke-dasharray: 6 4; }
svg.chart text.good { stroke: none; } svg.chart text.bad { stroke: none; } svg.chart text.warn { stroke: none; }
svg.chart circle.best { fill: none; stroke: var(--good); stroke-width: 2.5; }
.legend { display:flex; flex-wrap:wrap; gap: 4px 14px; font-size: .82rem; color: var(--muted); margin-top: 4px; }
.legend i { display:inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 5px;
  vertical-align: -1px; }
footer { color: var(--muted); font-size: .8rem; margin-top: 24px; }
@media print {
  body { background: #fff; color: #000; font-size: 12px; }
  main { max-width: none; padding: 0; }
  section, .verdict, .tile { border-color: #bbb; }
  section { break-inside: avoid; }
  table.sortable th::after { content: ""; }
  details { display: block; } details > * { display: block; }
}
"""

# Sort a table on a header click: numbers by the cell's data-sort (or its text), else as text.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, _) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    function key(row) {
      var cell = row.cells[column], raw = cell.getAttribute("data-sort");
      var text = raw !== null ? raw : cell.textContent.trim(), number = parseFloat(text);
      return isNaN(number) || raw === null && !/^-?[\\d.]+/.test(text) ? text.toLowerCase() : number;
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b), order = x < y ? -1 : x > y ? 1 : 0;
      return ascending ? order : -order;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


class Html(str):
    """Markup built by this module's own functions (or :func:`markup`): the one kind of text a page
    emits unescaped. Every other value reaching a cell, tile or list item is escaped, so raw user
    text cannot come out as HTML whichever of them it is handed to. Joined pieces are plain ``str``
    again: wrap a join of :class:`Html` pieces in ``Html(...)`` to hand it to a cell."""


def markup(template: str, *values: object) -> Html:
    """``template`` (fixed markup written in tightfit's code) with ``values`` escaped into its ``{}``."""
    return Html(template.format(*(escape(value) for value in values)))


def escape(value: object) -> Html:
    """``value`` as text safe inside HTML (``None`` shows as a dash); :class:`Html` passes as it is."""
    if isinstance(value, Html):
        return value
    return Html("-" if value is None else html.escape(str(value), quote=True))


def document(*, title: str, kind: str, verdict_html: str, sections: Iterable[str], source: str = "") -> str:
    """The whole page: head with the inline CSS, the title line, the verdict, the sections, a footer.

    Args:
        title: what the page is about (a run folder, a model, a pipeline name).
        kind: the kind of report, shown beside the title (``training run``, ``plan`` ...).
        verdict_html: the banner, from :func:`verdict`.
        sections: HTML fragments, in reading order.
        source: the file or folder the page was made from, named in the footer.
    """
    made = datetime.now().isoformat(timespec="seconds")
    origin = f" from <code>{escape(source)}</code>" if source else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)} · tightfit {escape(kind)}</title>\n<style>{CSS}</style>\n</head>\n"
        f'<body>\n<main data-report-kind="{escape(kind)}">\n'
        f'<header class="top"><h1>{escape(title)}</h1><span class="kind">tightfit {escape(kind)}</span></header>\n'
        f"{verdict_html}\n"
        + "\n".join(sections)
        + f"\n<footer>Made by tightfit {escape(__version__)} on {made}{origin}. "
        "One self-contained file: it needs no network.</footer>\n"
        f"</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def tile(label: str, value: str, *, key: str, sub: str = "") -> Html:
    """One key figure of the banner; ``key`` names it in the DOM (``data-key``) for scripts and tests."""
    sub_html = f'<div class="sub">{escape(sub)}</div>' if sub else ""
    size = " text" if len(value) > 12 else ""  # a name, not a number: smaller, so the tile stays one line high
    return Html(
        f'<div class="tile" data-key="{escape(key)}"><div class="label">{escape(label)}</div>'
        f'<div class="value{size}">{escape(value)}</div>{sub_html}</div>'
    )


def verdict(tone: str, headline: str, why: str = "", tiles: Sequence[str] = ()) -> str:
    """The banner a reader sees first: a coloured headline, one sentence of why, the key figures."""
    if tone not in TONES:
        raise ValueError(f"tone must be one of {TONES}, not {tone!r}")
    why_html = f'<div class="why">{escape(why)}</div>' if why else ""
    tiles_html = f'<div class="tiles">{"".join(tiles)}</div>' if tiles else ""
    return Html(
        f'<div class="verdict {tone}" data-verdict="{tone}"><div class="headline">{escape(headline)}</div>'
        f"{why_html}{tiles_html}</div>"
    )


def section(title: str, *body: str, note: str = "", section_id: str = "") -> Html:
    """A titled card; ``note`` is a muted sentence under the body (what a chart shows, a caveat)."""
    id_html = f' id="{escape(section_id)}"' if section_id else ""
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return Html(f"<section{id_html}><h2>{escape(title)}</h2>{''.join(body)}{note_html}</section>")


def grid(*sections: str) -> Html:
    """Sections side by side on a wide screen, stacked on a narrow one."""
    return Html(f'<div class="grid2">{"".join(sections)}</div>')


def badge(tone: str, text: str) -> Html:
    return Html(f'<span class="badge {escape(tone)}">{escape(text)}</span>')


class Cell:
    """A table cell whose shown content differs from its sort key or needs a class.

    Args:
        content: what the cell shows: text (escaped here) or :class:`Html` from this module.
        sort: the value the column sorts by (a number sorts numerically).
        numeric: right-aligned.
    """

    def __init__(self, content: object, *, sort: object = None, numeric: bool = False):
        self.html_text = escape(content)
        self.sort = sort
        self.numeric = numeric


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    row_classes: Sequence[str] | None = None,
    sortable: bool = True,
    numeric: Sequence[int] = (),
    table_id: str = "",
) -> str:
    """An HTML table; a cell is a :class:`Cell`, or any value (escaped; numbers right-aligned).

    Args:
        headers: the column titles.
        rows: one sequence of cells per row.
        row_classes: a CSS class per row (``best``, ``flagged``) or ``""``.
        sortable: sort on a click of a header.
        numeric: indexes of right-aligned columns.
        table_id: the table's ``id``.
    """
    head = "".join(
        f'<th class="num">{escape(name)}</th>' if index in numeric else f"<th>{escape(name)}</th>"
        for index, name in enumerate(headers)
    )
    body = []
    for position, row in enumerate(rows):
        row_class = row_classes[position] if row_classes else ""
        cells = []
        for index, cell in enumerate(row):
            if isinstance(cell, Cell):
                align = ' class="num"' if cell.numeric or index in numeric else ""
                sort = f' data-sort="{escape(cell.sort)}"' if cell.sort is not None else ""
                cells.append(f"<td{align}{sort}>{cell.html_text}</td>")
            else:
                align = ' class="num"' if index in numeric or isinstance(cell, (int, float)) else ""
                cells.append(f"<td{align}>{escape(cell)}</td>")
        class_html = f' class="{row_class}"' if row_class else ""
        body.append(f"<tr{class_html}>{''.join(cells)}</tr>")
    classes = ' class="sortable"' if sortable else ""
    id_html = f' id="{escape(table_id)}"' if table_id else ""
    return Html(
        f'<div class="table-wrap"><table{classes}{id_html}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def facts(pairs: Iterable[tuple[str, object]]) -> Html:
    """A two-column list of name / value (values escaped)."""
    items = "".join(f"<dt>{escape(name)}</dt><dd>{escape(value)}</dd>" for name, value in pairs)
    return Html(f'<dl class="facts">{items}</dl>')


def lines(items: Iterable[object]) -> Html:
    """A bulleted list (items escaped unless :class:`Html`)."""
    return Html('<ul class="lines">' + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>")


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: ``percent(0.9888) == "98.9 %"``."""
    return "-" if value is None else f"{value * 100:.{digits}f} %"
