"""``tightfit devices``: the detected device and the named device profiles."""

HELP = "show this machine's device and the named device profiles (memory, throughput, support)"
DESCRIPTION = """\
Show the device tightfit detects here (measured memory) and every named profile it can plan for:
total and usable memory, peak dense throughput per dtype, memory bandwidth and support for bf16,
fp16 autocast and bitsandbytes. Name one profile to see each figure with its source.
--memory applies a budget (6GiB, 512MB, ...) the way `tightfit plan --memory` does.

examples:
  tightfit devices
  tightfit devices rtx3050-laptop-6gb
  tightfit devices --memory 5GiB --json
"""


def add_arguments(parser) -> None:
    parser.add_argument(
        "name", nargs="?", help="show one profile (a name, or auto/cpu/cuda/mps) with the source of each figure"
    )
    parser.add_argument("--memory", metavar="SIZE", help="a memory budget that replaces the usable memory, e.g. 6GiB")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from tightfit.cli._output import console, print_json
    from tightfit.hardware.profiles import list_profiles, resolve_target, with_budget
    from tightfit.units import parse_memory

    budget = parse_memory(args.memory, where="--memory") if args.memory is not None else None
    if args.name:
        profile = resolve_target(args.name, memory=budget)
        if args.json:
            print_json(profile.to_dict())
        else:
            _render_one(profile, console())
        return 0
    detected = resolve_target("auto", memory=budget)
    named = [with_budget(profile, budget) if budget else profile for profile in list_profiles()]
    if args.json:
        print_json({"detected": detected.to_dict(), "profiles": [profile.to_dict() for profile in named]})
        return 0
    out = console()
    out.print(_table("This machine", [detected]))
    out.print()
    out.print(_table("Named profiles" + (" (with the budget)" if budget else ""), named))
    out.print(
        "[dim]Memory in GiB; fp32..bf16 are dense peak TFLOP/s (no sparsity), '-' where the dtype has no "
        "fast path and runs at the fp32 rate; amp = fp16 autocast, bnb = bitsandbytes. m1/m2 and cpu "
        "memory is unified (shared with the OS). `tightfit devices NAME` gives the source of every figure.[/]"
    )
    return 0


def _tflops(profile, dtype: str) -> str:
    value = profile.peak_flops.get(dtype)
    return f"{value / 1e12:.1f}" if value else "-"


def _table(title: str, profiles):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    # Compact enough for an 80-column terminal: sizes in GiB, throughput in TFLOP/s.
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False
    )
    table.add_column("Name", no_wrap=True)
    for column in ("GiB", "Usable", "fp32", "tf32", "fp16", "bf16", "GB/s"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("Supports", no_wrap=True)
    for profile in profiles:
        supports = [
            label
            for label, flag in (
                ("bf16", profile.supports_bf16),
                ("amp", profile.supports_fp16_autocast),
                ("bnb", profile.supports_bitsandbytes),
            )
            if flag
        ]
        table.add_row(
            escape(profile.name),
            f"{profile.memory_bytes / 2**30:.1f}",
            f"{profile.usable_bytes / 2**30:.1f}",
            *(_tflops(profile, dtype) for dtype in ("fp32", "tf32", "fp16", "bf16")),
            f"{profile.memory_bandwidth / 1e9:.0f}" if profile.memory_bandwidth else "-",
            " ".join(supports) or "-",
        )
    return table


def _render_one(profile, out) -> None:
    from rich.markup import escape
    from rich.table import Table

    from tightfit.units import format_bytes

    out.print(f"[bold]{escape(profile.name)}[/]: {escape(profile.description)}")
    table = Table(show_header=True)
    table.add_column("Figure", no_wrap=True)
    table.add_column("Value", justify="right", no_wrap=True)
    table.add_column("Source")
    rows = [
        ("memory_bytes", format_bytes(profile.memory_bytes)),
        ("usable_bytes", format_bytes(profile.usable_bytes)),
        *((f"peak_flops.{dtype}", f"{flops / 1e12:.2f} TFLOP/s") for dtype, flops in profile.peak_flops.items()),
        ("memory_bandwidth", f"{profile.memory_bandwidth / 1e9:.1f} GB/s"),
        ("supports_bf16", str(profile.supports_bf16)),
        ("supports_fp16_autocast", str(profile.supports_fp16_autocast)),
        ("supports_bitsandbytes", str(profile.supports_bitsandbytes)),
        ("overhead.context_bytes", format_bytes(profile.overhead["context_bytes"])),
        ("overhead.workspace_bytes", format_bytes(profile.overhead["workspace_bytes"])),
        ("overhead.fragmentation", f"{profile.overhead['fragmentation']:.0%}"),
    ]
    for figure, value in rows:
        table.add_row(figure, value, escape(profile.sources.get(figure, "-")))
    out.print(table)
