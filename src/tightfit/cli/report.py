"""``tightfit report``: one self-contained HTML page for a run, a plan, a compression run, a doctor
report or a study."""

HELP = "write one offline HTML page for a training run, plan, compression run, doctor report or study"
DESCRIPTION = """\
Write a self-contained HTML page (no network needed: inline SVG charts, no fonts fetched) for
PATH, which is one of:

  a training run folder           curves, memory over the run, throughput, checkpoints, diagnosis
  a compression output folder     size / latency / accuracy trade-off, the best artifact, flags
  (or its report.json)
  a study folder (results.json)   stage feasibility, results with 95 % intervals, paired tests
  tightfit plan --json output     the memory breakdown against the usable memory, the alternatives
  tightfit doctor --json output   the readiness verdict, the checks, what to do

train and compress write report.html by default; plan and doctor write one with --html FILE.

examples:
  tightfit report runs/20260101-120000                 # -> runs/20260101-120000/report.html
  tightfit report runs/digits/compressed --open
  tightfit plan --model torchvision:resnet50 --input 3x224x224 --json > plan.json && tightfit report plan.json
  tightfit doctor --json > doctor.json; tightfit report doctor.json -o doctor.html
"""


def add_arguments(parser) -> None:
    parser.add_argument(
        "path", metavar="PATH", help="a run, compression or study folder, or a plan/doctor/compression/study JSON file"
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="the page (default: PATH/report.html, or NAME.html beside a JSON file)"
    )
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--json", action="store_true", help='print {"kind": ..., "path": ...} instead of a sentence')


def run(args) -> int:
    from tightfit.cli._output import print_json
    from tightfit.report.build import check_output, default_output, render, write_html

    output = check_output(args.output, "--output") if args.output else default_output(args.path)
    kind, text = render(args.path)
    path = write_html(text, output)
    if args.json:
        print_json({"kind": kind, "path": str(path)})
    else:
        print(f"{kind} report written to {path}")
    if args.open:
        open_in_browser(path)
    return 0


def open_in_browser(path) -> None:
    """Open a page in the user's browser (a note on stderr where there is none)."""
    import sys
    import webbrowser
    from pathlib import Path

    if not webbrowser.open(Path(path).resolve().as_uri()):
        print(f"tightfit report: no browser found; open {path} yourself", file=sys.stderr)
