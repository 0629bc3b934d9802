"""The report a training run ends with: a plain callback the layers above ``training/`` attach
(``tightfit train``, ``tightfit.train``, a study's stages), so the trainer never imports ``report/``.
"""

from typing import Any

from tightfit.report.build import write_report


def report_callbacks(config: Any) -> list:
    """``[HtmlReport()]`` when the run config asks for a page (``logging.report``), else ``[]``."""
    return [HtmlReport()] if config.logging.report else []


class HtmlReport:
    """Write ``RUN_DIR/report.html`` when the run ends (``logging.report``), after ``summary.json``.

    The page is made from the files the run wrote (see :mod:`tightfit.report.run`), in about
    40 ms for the digits recipe, and its path is added to the summary that ``fit`` returns as
    ``report``. A page that cannot be written is a warning, not a failed run: the model and the
    summary are already on disk.
    """

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if not trainer.process.is_main:
            return  # rank 0 alone writes the run's files
        try:
            summary["report"] = str(write_report(trainer.run_dir))
        except Exception as error:  # noqa: BLE001 - the run itself succeeded; say why the page is missing
            trainer.console.print(f"[yellow]warning:[/] report.html not written: {error}")
