"""Self-contained HTML reports: one offline page per training run, plan, compression run, doctor
report and study.

``write_report(path)`` finds out what ``path`` is and writes its page; each kind has its own
module (``run``, ``plan``, ``compression``, ``doctor``, ``study``) that turns the JSON a command
wrote into HTML through the shared shell (:mod:`tightfit.report.page`) and the inline-SVG charts
(:mod:`tightfit.report.charts`). Nothing here imports torch: a page is made from files on disk.
"""

from tightfit.report.build import KINDS, detect_kind, render, render_data, write_html, write_report

__all__ = ["KINDS", "detect_kind", "render", "render_data", "write_html", "write_report"]
