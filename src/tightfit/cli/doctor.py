"""``tightfit doctor``: a report to paste into a bug report, and a readiness verdict."""

HELP = "check this machine (and a dataset folder) and say whether it is ready to train"
DESCRIPTION = """\
Check Python, torch and its build, every accelerator (CUDA GPUs, Apple MPS, the CPU), system
memory and swap, disk space at the run directory and the installed packages; run a smoke test
on the best device; with --data, check a dataset folder (splits, images per class, corrupt
images, captions that do not match). Ends with recommendations and a verdict.

Exit status: 0 ready (warnings allowed), 1 a critical check failed, 2 bad arguments.

examples:
  tightfit doctor
  tightfit doctor --data data/casual_shoes --run-dir runs
  tightfit doctor --json > doctor.json
  tightfit doctor --html doctor.html               # one offline page (tightfit report)
"""

STATUS_LABELS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "info": "[dim]info[/]"}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON (same facts as the table)")
    parser.add_argument("--html", metavar="FILE", help="also write the report as a self-contained HTML page")
    parser.add_argument("--data", metavar="DIR", help="also check this dataset folder")
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        default="runs",
        help="where runs will be written; its free disk space is checked (default: runs)",
    )
    parser.add_argument(
        "--no-smoke-test", action="store_true", help="skip the allocate/matmul/train-step test on the best device"
    )


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from tightfit.cli._output import console, print_json
    from tightfit.errors import TightfitError
    from tightfit.hardware.doctor import run_doctor

    if args.html:
        from tightfit.report.build import check_output

        check_output(args.html, "--html")
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TightfitError(f"--run-dir: {str(run_dir)!r} is a file, not a folder")
    # Progress goes to stderr so that --json output stays one clean document on stdout.
    progress_console = Console(stderr=True, highlight=False)
    with _Progress(progress_console) as progress:
        report = run_doctor(
            data_dir=args.data,
            run_dir=run_dir,
            smoke_test=not args.no_smoke_test,
            progress=progress.stage,
            dataset_progress=progress.images,
        )
    if args.json:
        print_json(report)
    else:
        render(report, console())
    if args.html:
        import sys

        from tightfit.report.build import render_data, write_html

        path = write_html(render_data("doctor", report, source="tightfit doctor"), args.html)
        print(f"doctor report written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report["verdict"]["ready"] else 1


class _Progress:
    """A spinner naming the running stage, and a bar while dataset images are checked."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        self._stage = None
        self._images = None

    def __enter__(self):
        self._progress.__enter__()
        self._stage = self._progress.add_task("doctor: starting", total=None)
        return self

    def __exit__(self, *exc_info):
        return self._progress.__exit__(*exc_info)

    def stage(self, name: str) -> None:
        self._progress.update(self._stage, description=f"doctor: {name}")

    def images(self, done: int, total: int) -> None:
        if self._images is None:
            self._images = self._progress.add_task("checking images", total=total)
        self._progress.update(self._images, completed=done)


def render(report: dict, console) -> None:
    """Print the report as rich tables: checks, packages, dataset, recommendations, verdict."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]tightfit doctor[/] (tightfit {report['tightfit_version']})")
    checks = Table(title="Checks", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    checks.add_column("Status", no_wrap=True)
    checks.add_column("Check", no_wrap=True)
    checks.add_column("Details")
    for check in report["checks"]:
        label = STATUS_LABELS[check["status"]]
        checks.add_row(label, check["name"] + (" *" if check["critical"] else ""), escape(check["summary"]))
    console.print(checks)
    console.print("[dim]* critical: a failure makes the verdict 'not ready'[/]")

    packages = report["packages"]
    if isinstance(packages, list):
        table = Table(title="Packages", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("Package", "Version", "Kind", "Needed for"):
            table.add_column(column, no_wrap=column != "Needed for")
        for row in packages:
            needed_for = escape(row["needed_for"])
            if row["status"] == "installed":
                version = row["version"]
            else:
                version = (
                    f"[red]{row['version']} < {row['minimum']}[/]"
                    if row["status"] == "outdated"
                    else "[yellow]missing[/]"
                )
                needed_for += f" [yellow]({escape(row['install'])})[/]"
            kind = "required" if row["required"] else (escape(f"[{row['extra']}]") if row["extra"] else "optional")
            table.add_row(row["name"], version, kind, needed_for)
        console.print(table)

    dataset = report.get("dataset")
    if dataset is not None:
        _render_dataset(dataset, console)

    if report["recommendations"]:
        console.print("[bold]Recommendations[/]")
        advice_table = Table.grid(padding=(0, 1))
        advice_table.add_column(justify="right", no_wrap=True)
        advice_table.add_column()
        for number, advice in enumerate(report["recommendations"], start=1):
            advice_table.add_row(f"  {number}.", escape(advice))
        console.print(advice_table)
    verdict = report["verdict"]
    color = "red" if not verdict["ready"] else ("yellow" if verdict["warnings"] else "green")
    console.print(f"[bold {color}]Verdict: {escape(verdict['summary'])}[/]")


def _render_dataset(dataset: dict, console) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if "error" in dataset:
        console.print(f"[red]Dataset: {escape(dataset['error'])}[/]")
        return
    table = Table(
        title=escape(f"Dataset {dataset['path']} ({dataset['layout']})"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("Split", "Images", "Per class", "Corrupt", "Captions"):
        table.add_column(column)
    for name, split in dataset["splits"].items():
        classes = split["classes"]
        per_class = (
            escape(", ".join(f"{cls} {count}" for cls, count in classes.items())) if classes is not None else "-"
        )
        captions = split["captions"]
        if captions["source"]:
            caption_text = escape(f"{captions['count']} from {captions['source']}")
            if captions["missing"] or captions["orphaned"]:
                caption_text += f" ([red]{len(captions['missing'])} missing, {len(captions['orphaned'])} orphaned[/])"
        else:
            caption_text = "-"
        corrupt = f"[red]{len(split['corrupt'])}[/]" if split["corrupt"] else "0"
        table.add_row(escape(name), str(split["images"]), per_class, corrupt, caption_text)
    console.print(table)
    if dataset["size_range"]:
        size = dataset["size_range"]
        modes = ", ".join(f"{mode} {count}" for mode, count in dataset["image_modes"].items())
        widths, heights = (size["min_width"], size["max_width"]), (size["min_height"], size["max_height"])
        if widths[0] == widths[1] and heights[0] == heights[1]:
            sizes = f"all {widths[0]}x{heights[0]} px"
        else:
            sizes = f"width {widths[0]}-{widths[1]} px, height {heights[0]}-{heights[1]} px"
        console.print(f"  readable images: {sizes}; modes: {modes}")
    for problem in dataset["problems"]:
        color = "red" if problem["severity"] == "error" else "yellow"
        console.print(f"  [{color}]{problem['severity']}[/]: {escape(problem['message'])}")
