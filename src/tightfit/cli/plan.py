"""``tightfit plan``: will a model train on a device, and with which settings?"""

HELP = "estimate peak memory and time of a training step, and recommend settings that fit a device"
DESCRIPTION = """\
Estimate the peak memory (parameters, gradients, optimizer state, activations, device overhead)
of one training step on fake tensors -- no weights are allocated, so a 7B model plans on a laptop --
and compare it with a device's usable memory.

With --batch-size: the peak and its breakdown for exactly those settings, and a verdict: fits,
tight (less than --margin headroom) or does not fit. Without it: the fastest configuration
(micro-batch, accumulation steps, precision, activation checkpointing, optimizer) that fits with
--margin headroom and reaches --effective-batch, with the alternatives and what each costs.
Times are estimates from counted FLOPs and the profile's peak FLOP/s at a stated utilisation;
--measure runs real steps on this machine and prints them beside the estimate.

Given a training CONFIG.yaml (what `tightfit train CONFIG.yaml` reads, with the same key=value
overrides): exactly that run planned -- its model, input, micro-batch, precision, optimizer,
checkpointing and lora: section -- on --device (default: the config's device).

Given a PIPELINE.yaml instead of --model/--input: every stage planned against one device, as one
feasibility table (see examples/pipelines/seed002-rtx3050.yaml).

examples:
  tightfit plan --model torchvision:resnet50 --input 3x224x224 --device rtx3050-laptop-6gb
  tightfit plan --model builtin:digits-cnn --input 1x8x8 --batch-size 64 --measure
  tightfit plan --model hf:packaged:llama-7b --input tokens:512 --lora-rank 8 --device a100-80gb --json
  tightfit plan --model torchvision:resnet50 --input 3x224x224 --inference --precision bf16 --device rtx3050-laptop-6gb
  tightfit plan recipes/lora-causal-lm.yaml --measure                   # the run train would do, then measured
  tightfit plan recipes/qlora-7b.yaml --device m1-16gb
  tightfit plan examples/pipelines/seed002-rtx3050.yaml --html pipeline.html

With --inference: the forward-only peak (parameters + the activations alive at once under
inference mode) at --batch-size, or the largest batch that fits, and the time per sample.
A study file (tightfit run's) is planned stage by stage, extract stages forward-only.

several devices (per-rank peak, devices needed, tokens/s with communication; docs/distributed.md):
  tightfit plan --model hf:packaged:llama-7b --input tokens:2048 --devices a100-40gb --strategy fsdp
  tightfit plan --model hf:packaged:llama-7b --input tokens:2048 --devices 4xrtx4090-24gb --strategy ddp
"""

from tightfit.names import OPTIMIZERS as OPTIMIZER_CHOICES
from tightfit.names import PRECISIONS as PRECISION_CHOICES
from tightfit.names import QUANTIZE_BASES, canonical_precision
from tightfit.names import STRATEGIES as STRATEGY_CHOICES


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | PIPELINE.yaml [key=value ...]",
        help="a training config (plan that run; key=value overrides as in train) or a pipeline file",
    )
    parser.add_argument("--model", metavar="SPEC", help="builtin:NAME, torchvision:NAME, hf:DIR, module.path:callable")
    parser.add_argument(
        "--input", metavar="SHAPE", help="per-sample input: 3x224x224, tokens:512, or several, comma-separated"
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="check this micro-batch size instead of recommending one"
    )
    parser.add_argument(
        "--precision",
        type=canonical_precision,
        choices=PRECISION_CHOICES,
        help="fix the precision (default: chosen; fp32 with --batch-size)",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, help="fix the optimizer (default: adamw)")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force activation checkpointing of the repeated blocks on (or off with --no-checkpointing)",
    )
    parser.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R on a frozen base")
    parser.add_argument(
        "--quantize-base",
        choices=QUANTIZE_BASES,
        help="with --lora-rank: a quantized frozen base, nf4 (QLoRA; the target's backend) or int8 (torchao)",
    )
    parser.add_argument(
        "--device",
        metavar="PROFILE",
        help="a device profile (tightfit devices), or auto/cpu/cuda/mps (default: this machine)",
    )
    parser.add_argument(
        "--memory", metavar="SIZE", help="a memory budget replacing the device's usable memory, e.g. 6GiB"
    )
    parser.add_argument(
        "--effective-batch", type=int, metavar="N", help="samples per optimizer step, reached by gradient accumulation"
    )
    parser.add_argument("--margin", type=float, default=0.1, help="headroom to keep free, as a fraction (default 0.1)")
    parser.add_argument("--samples", type=int, metavar="N", help="samples per epoch, for the epoch-time estimate")
    parser.add_argument(
        "--measure", action="store_true", help="also run real steps on this machine: measured time and peak"
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="plan a forward-only pass (feature extraction, prediction): no gradients, no optimizer state",
    )
    parser.add_argument(
        "--devices",
        metavar="[N x]PROFILE",
        help="plan per rank on N devices (4xa100-40gb), or find how many are needed (a100-40gb)",
    )
    parser.add_argument(
        "--strategy", choices=STRATEGY_CHOICES, help="with --devices: how ranks share the model (default fsdp)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--html", metavar="FILE", help="also write the plan as a self-contained HTML page")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the pipeline file name module.path:callable models (runs their Python code)",
    )


def run(args) -> int:
    from tightfit.errors import ConfigError

    if args.html:
        from tightfit.report.build import check_output

        check_output(args.html, "--html")  # before planning, which can take a while
    if args.items:
        if args.model or args.input or args.batch_size or args.lora_rank:
            raise ConfigError("give either a CONFIG.yaml / PIPELINE.yaml or --model/--input, not both")
        from tightfit.cli.train import _split_items
        from tightfit.config import read_yaml

        path, overrides = _split_items(args.items)
        if path is None:
            raise ConfigError("plan: give the config file first, then key=value overrides")
        if "stages" in read_yaml(path):
            if overrides:
                raise ConfigError("plan: key=value overrides apply to a training config, not to a pipeline file")
            args.pipeline = path
            return _run_pipeline(args)
        return _run_config(args, path, overrides)
    if not args.model or not args.input:
        raise ConfigError("--model and --input are required (or give a PIPELINE.yaml)")
    if args.devices:
        return _run_distributed(args)
    if args.strategy:
        raise ConfigError(f"--strategy {args.strategy}: plans several devices; give them with --devices (4xa100-40gb)")
    from tightfit.hardware.profiles import resolve_target

    profile = resolve_target(args.device, args.memory)
    if args.inference:
        return _run_inference(args, profile)
    from tightfit.plan import ModelRequest, plan

    with _status(args.json, f"planning {args.model} on {profile.name}"):
        result = plan(
            ModelRequest(
                args.model,
                args.input,
                dict(
                    batch_size=args.batch_size,
                    precision=args.precision,
                    optimizer=args.optimizer,
                    checkpointing=args.checkpointing,
                    lora_rank=args.lora_rank,
                    quantize_base=args.quantize_base,
                    profile=profile,
                    effective_batch_size=args.effective_batch,
                    margin=args.margin,
                    samples=args.samples,
                    measure=args.measure,
                ),
            )
        )
    if args.json:
        from tightfit.cli._output import print_json

        print_json(result.to_dict())
    else:
        _render(result)
    _write_html(args, result.to_dict())
    return 0


def _run_config(args, path: str, overrides: list[str]) -> int:
    from tightfit.config import load_config
    from tightfit.plan import RunRequest, plan

    config = load_config(path, overrides, trust_code=args.trust_code)
    with _status(args.json, f"planning {path}"):
        result = plan(
            RunRequest(config, dict(device=args.device, memory=args.memory, margin=args.margin, measure=args.measure))
        )
    if args.json:
        from tightfit.cli._output import print_json

        print_json(result.to_dict())
    else:
        _render(result)
    _write_html(args, result.to_dict())
    return 0


def _run_inference(args, profile) -> int:
    from rich.markup import escape

    from tightfit.cli._output import console, print_json
    from tightfit.errors import ConfigError
    from tightfit.names import INFERENCE_PRECISIONS
    from tightfit.plan import InferenceRequest, plan
    from tightfit.plan.inference import choose_inference_precision
    from tightfit.units import format_bytes, format_seconds

    if args.lora_rank or args.effective_batch or args.measure or args.optimizer or args.checkpointing is not None:
        raise ConfigError(
            "--inference plans a forward pass: --lora-rank, --effective-batch, --optimizer, "
            "--checkpointing and --measure do not apply"
        )
    if args.precision and args.precision not in INFERENCE_PRECISIONS:
        raise ConfigError(
            f"--precision: {args.precision} is not an inference precision ({', '.join(INFERENCE_PRECISIONS)})"
        )
    settings = {"batch_size": args.batch_size, "profile": profile, "margin": args.margin, "samples": args.samples}
    with _status(args.json, f"planning a forward pass of {args.model} on {profile.name}"):
        if args.precision:
            result, reason = (
                plan(InferenceRequest(args.model, args.input, dict(settings, precision=args.precision))),
                "as given",
            )
        else:  # each precision the device runs; ties to the safer, as in training plans
            result, reason = choose_inference_precision(args.model, args.input, **settings)
    precision = result.precision
    if args.json:
        print_json(result.to_dict() | {"precision_reason": reason})
        return 0
    out = console()
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}[result.verdict]
    out.print(
        f"[bold]{escape(result.model)}[/] on [bold]{escape(result.input)}[/], forward only, {precision} -> "
        f"[bold]{escape(result.device)}[/] ({result.parameters:,} parameters)"
    )
    out.print(f"[bold {colour}]{result.verdict.upper()}[/]: {escape(result.why)}")
    out.print(f"precision {precision}: {escape(reason)}")
    parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in result.breakdown.items() if value)
    out.print(f"peak {format_bytes(result.peak_bytes)} at batch {result.batch_size}: {parts}")
    if result.time_per_sample_s:
        timing = f"estimated {format_seconds(result.time_per_sample_s * result.batch_size)} per batch"
        if result.total_time_s:
            timing += f", {format_seconds(result.total_time_s)} for {result.samples} samples"
        out.print(timing)
    for note in result.notes:
        out.print(f"[dim]- {escape(note)}[/]")
    return 0


def _write_html(args, plan: dict) -> None:
    """With --html: the plan's page; its path on stderr, so that --json output stays one document."""
    import sys

    if not args.html:
        return
    from tightfit.report.build import render_data, write_html

    path = write_html(render_data("plan", plan, source="tightfit plan"), args.html)
    print(f"plan report written to {path}", file=sys.stderr if args.json else sys.stdout)


def _status(quiet: bool, text: str):
    """A spinner on stderr while estimates run (none with --json, whose stdout a script reads)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text + " (estimating on fake tensors) ...")


def _render(result) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tightfit.cli._output import console
    from tightfit.memory.report import CATEGORIES
    from tightfit.units import format_bytes, format_seconds

    out = console()
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}[result.verdict]
    out.print(
        f"[bold]{escape(result.model)}[/] on [bold]{escape(result.input)}[/] -> [bold]{escape(result.device)}[/] "
        f"(usable {format_bytes(result.budget_bytes)}, margin {result.margin:.0%}; "
        f"{result.parameters:,} parameters, {result.trainable_parameters:,} trainable)"
    )
    out.print(f"[bold {colour}]{result.verdict.upper()}[/]: {escape(result.why)}")
    if result.recommendation:
        rec = result.recommendation
        out.print(
            f"[bold]recommended:[/] micro-batch {rec['micro_batch_size']} x {rec['accumulation_steps']} accumulation "
            f"= {rec['effective_batch_size']} per step, {rec['precision']}, checkpointing "
            f"{'on' if rec['checkpointing'] else 'off'}, {rec['optimizer']}"
        )
    for name, choice in result.resolved.items():
        value = choice["value"]
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        backend = f" through {choice['backend']}" if choice.get("backend") else ""
        out.print(f"[bold]{name}:[/] {escape(str(shown))}{escape(backend)} ({escape(choice['reason'])})")
    moment = f" ({result.peak_moment})" if result.peak_moment else ""
    breakdown = Table(
        box=box.SIMPLE, title=f"peak {format_bytes(result.peak_bytes)} at batch {result.batch_size or 1}{moment}"
    )
    breakdown.add_column("category")
    breakdown.add_column("bytes", justify="right")
    breakdown.add_column("share", justify="right")
    for name in CATEGORIES:
        share = result.breakdown[name] / result.peak_bytes if result.peak_bytes else 0
        breakdown.add_row(name, format_bytes(result.breakdown[name]), f"{share:.0%}")
    out.print(breakdown)
    timing = f"estimated step time {format_seconds(result.step_time_s)}"
    if result.epoch_time_s is not None:
        timing += f", epoch {format_seconds(result.epoch_time_s)}"
    if result.flops_per_step:
        timing += f" ({_flops(result.flops_per_step)} per optimizer step)"
    out.print(timing)
    if result.alternatives:
        table = Table(box=box.SIMPLE_HEAD, title="alternatives")
        for column in ("precision", "ckpt", "optim", "batch", "peak", "est. step", "cost"):
            table.add_column(column, justify="right" if column in ("batch", "peak", "est. step") else "left")
        for option in result.alternatives:
            batch = f"{option['micro_batch_size']} x {option['accumulation_steps']}" if option["fits"] else "-"
            table.add_row(
                option["precision"],
                "on" if option["checkpointing"] else "off",
                option["optimizer"],
                batch,
                format_bytes(option["peak_bytes"]),
                format_seconds(option["step_time_s"]),
                escape(option["note"]),
            )
        out.print(table)
    if result.measured:
        measured = result.measured
        out.print(
            f"[bold]measured[/] on {measured['device']} at batch {measured['batch_size']}: step "
            f"{format_seconds(measured['step_time_s'])} (estimate for {escape(result.device)}: "
            f"{format_seconds(result.step_time_s)}), "
            f"peak {format_bytes(measured['peak_bytes'])} (estimate: {format_bytes(result.peak_bytes)})"
        )
    for note in result.notes:
        out.print(f"[dim]- {escape(note)}[/]")
    out.print(f"[dim]planned in {result.seconds:.1f} s[/]")


def _flops(value: int) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} FLOP"


def _run_pipeline(args) -> int:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tightfit.cli._output import console, print_json
    from tightfit.plan import PipelineRequest, plan
    from tightfit.units import format_bytes, format_seconds

    config = _pipeline_config(args.pipeline, trust_code=args.trust_code)
    if args.json:
        result = plan(PipelineRequest(config, dict(device=args.device, memory=args.memory)))
        print_json(result.to_dict())
        _write_html(args, result.to_dict())
        return 0
    from rich.console import Console

    with Console(stderr=True).status("planning ...") as status:
        result = plan(
            PipelineRequest(
                config,
                dict(
                    device=args.device,
                    memory=args.memory,
                    on_stage=lambda name: status.update(f"planning stage {name} (estimating on fake tensors) ..."),
                ),
            )
        )
    out = console()
    out.print(
        f"[bold]{escape(result.name)}[/] on [bold]{escape(result.device)}[/] "
        f"(usable {format_bytes(result.budget_bytes)}, margin {result.margin:.0%})"
    )
    table = Table(box=box.SIMPLE_HEAD)
    timed = ("peak", "est. step", "est. epoch", "epochs", "est. stage")
    for column in ("stage", "verdict", "batch", "precision", "ckpt", *timed):
        table.add_column(column, justify="right" if column in timed else "left")
    colours = {"fits": "green", "tight": "yellow", "does not fit": "red"}
    for stage in result.stages:
        batch = "-"
        if stage.micro_batch_size:
            batch = (
                f"{stage.micro_batch_size} x {stage.accumulation_steps}"
                if stage.accumulation_steps
                else str(stage.micro_batch_size)
            )
        peak = format_bytes(stage.peak_bytes) + (" RAM" if stage.kind == "cpu" else "")
        table.add_row(
            escape(stage.name),
            f"[{colours[stage.verdict]}]{stage.verdict}[/]",
            batch,
            stage.precision or "-",
            "-" if stage.checkpointing is None else ("on" if stage.checkpointing else "off"),
            peak,
            format_seconds(stage.step_time_s),
            format_seconds(stage.epoch_time_s),
            str(stage.epochs) if stage.epochs else "-",
            format_seconds(stage.time_s),
        )
    out.print(table)
    if result.total_time_s is not None:
        out.print(
            f"[bold]estimated total: {result.total_time_s / 3600:.1f} h[/] ({format_seconds(result.total_time_s)})"
        )
    for stage in result.stages:
        what = {
            "train": f"{stage.model} on {stage.input}",
            "extract": f"{stage.model} on {stage.input}, forward only",
        }.get(stage.kind, "CPU stage")
        note = f" ({stage.note})" if stage.note else ""
        out.print(f"- [bold]{escape(stage.name)}[/]: {escape(what)}{escape(note)}: {escape(stage.why)}")
    out.print(
        "[dim]batch = micro-batch x accumulation steps (extract: the forward batch); est. epoch of an extract "
        "stage = one pass over its samples; times are estimates (FLOPs / peak FLOP/s at the "
        "stated utilisation); peaks include the device overhead.[/]"
    )
    out.print(f"[dim]planned in {result.seconds:.1f} s[/]")
    _write_html(args, result.to_dict())
    return 0


def _pipeline_config(path, *, trust_code: bool = False):
    """A pipeline file, or a study file (``tightfit run``'s) turned into the pipeline that plans it."""
    from tightfit.plan.pipeline import load_pipeline
    from tightfit.study.spec import is_study_file, read_study_yaml

    if not is_study_file(read_study_yaml(path)):
        return load_pipeline(path, trust_code=trust_code)
    from tightfit.study.plan import study_pipeline
    from tightfit.study.spec import load_study

    return study_pipeline(load_study(path, check_files=False, trust_code=trust_code))


def _run_distributed(args) -> int:
    """``--devices``: each rank's peak for N devices, or the smallest N that fits."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tightfit.cli._output import console, print_json
    from tightfit.errors import ConfigError
    from tightfit.plan import DistributedRequest, plan
    from tightfit.units import format_seconds

    if args.device or args.memory or args.measure or args.html:
        raise ConfigError(
            "--devices: names the device itself; drop --device/--memory/--measure (and --html, not drawn for per-rank "
            "plans yet)"
        )
    args.strategy = args.strategy or "fsdp"
    with _status(args.json, f"planning {args.model} on {args.devices} ({args.strategy})"):
        result = plan(
            DistributedRequest(
                args.model,
                args.input,
                dict(
                    devices=args.devices,
                    strategy=args.strategy,
                    batch_size=args.batch_size or 1,
                    precision=args.precision or "bf16-pure",
                    optimizer=args.optimizer or "adamw",
                    checkpointing=True if args.checkpointing is None else args.checkpointing,
                    lora_rank=args.lora_rank,
                    margin=args.margin,
                ),
            )
        )
    if args.json:
        print_json(result.to_dict())
        return 0
    out = console()
    out.print(
        f"[bold]{escape(result.model)}[/] on [bold]{escape(result.input)}[/], {result.strategy} on "
        f"{escape(result.device)}: "
        f"micro-batch {result.micro_batch_size} per rank, {result.precision}, checkpointing "
        f"{'on' if result.checkpointing else 'off'}, "
        f"{result.optimizer} ({result.parameters:,} parameters, {result.trainable_parameters:,} trainable)"
    )
    if result.devices_needed is not None:
        out.print(f"[bold green]devices needed: {result.devices_needed}[/]")
    else:
        out.print(f"[bold red]does not fit on {escape(args.devices)}[/]")
    table = Table(box=box.SIMPLE_HEAD, title="per rank, GiB", padding=(0, 1))
    columns = (
        "N",
        "peak",
        "states",
        "optim tmp",
        "activ",
        "gathered",
        "buffers",
        "overhead",
        "fits",
        "step",
        "tokens/s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "fits" else "right")
    for row in result.rows:
        parts = row.breakdown
        states = parts["parameters"] + parts["gradients"] + parts["optimizer"]
        table.add_row(
            str(row.devices),
            f"{row.peak_bytes / 2**30:.2f}",
            f"{states / 2**30:.2f}",
            *(
                f"{parts[name] / 2**30:.2f}"
                for name in ("optimizer_temporaries", "activations", "units_in_flight", "communication", "overhead")
            ),
            "[green]yes[/]" if row.fits else "[red]no[/]",
            format_seconds(row.step_time_s),
            f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "-",
        )
    out.print(table)
    out.print(
        "[dim]states: parameters + gradients + optimizer state held by one rank; gathered: FSDP units "
        "in flight; buffers: reduce-scatter or DDP bucket copies; step and tokens/s are estimates[/]"
    )
    for note in result.notes + result.rows[-1].notes:
        out.print(f"[dim]- {escape(note)}[/]")
    return 0
