"""``tightfit batch-size``: the largest batch whose training step really runs on a device or budget."""

HELP = "find the largest batch size that trains within a memory budget (predicted, then confirmed)"
DESCRIPTION = """\
Find the largest micro-batch size whose training step runs within a memory budget, keeping
--margin of it free. The estimator predicts it first on fake tensors (no memory used); real
steps then confirm it and bisect only what remains -- usually one or two steps, not the ten of
doubling until out-of-memory. Weights and random generators are left as they were.

On CPU, --memory sets a simulated budget: the memory tracker raises the same out-of-memory
error a GPU would when live tensors exceed it. On CUDA or MPS the device is the budget (or
--memory, if smaller).

examples:
  tightfit batch-size --model builtin:digits-cnn --input 1x8x8 --memory 64MiB
  tightfit batch-size --model torchvision:resnet18 --input 3x64x64 --memory 2GiB --optimizer sgd --json
  tightfit batch-size --model builtin:tiny-gpt --input tokens:128 --device cuda --precision bf16
  tightfit batch-size --model torchvision:resnet18 --input 3x64x64 --memory 1GiB --inference
"""

from tightfit.names import OPTIMIZERS as OPTIMIZER_CHOICES
from tightfit.names import PRECISIONS as PRECISION_CHOICES
from tightfit.names import canonical_precision


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="SPEC", help="builtin:NAME, torchvision:NAME, hf:DIR, module.path:callable"
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="SHAPE",
        help="per-sample input: 3x224x224, tokens:512, or several, comma-separated",
    )
    parser.add_argument("--memory", metavar="SIZE", help="memory budget, e.g. 2GiB (simulated on CPU; required there)")
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="where the trial steps run: cpu, cuda, cuda:1, mps (default: cpu with --memory, else the best device)",
    )
    parser.add_argument(
        "--precision",
        type=canonical_precision,
        choices=PRECISION_CHOICES,
        default="fp32",
        help="training precision (default fp32)",
    )
    parser.add_argument(
        "--optimizer", choices=OPTIMIZER_CHOICES, default="adamw", help="optimizer whose state must fit (default adamw)"
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="checkpoint the activations of the repeated blocks"
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        metavar="K",
        help="gradient accumulation steps (gradients stay live; default 1)",
    )
    parser.add_argument("--margin", type=float, default=0.1, help="fraction of the budget kept free (default 0.1)")
    parser.add_argument(
        "--max-batch-size", type=int, default=4096, metavar="N", help="largest batch size considered (default 4096)"
    )
    parser.add_argument(
        "--num-classes", type=int, metavar="N", help="classes of the model's head, when the spec takes it"
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="forward-only passes (feature extraction): no gradients, no optimizer state",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (batch_size, peak_bytes, trials, ...)"
    )


def run(args) -> int:
    from tightfit.errors import ConfigError
    from tightfit.units import parse_memory

    budget_bytes = parse_memory(args.memory, where="--memory") if args.memory is not None else None
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin: must be in [0, 1), got {args.margin}")
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size: must be at least 1, got {args.max_batch_size}")
    if args.accumulation < 1:
        raise ConfigError(f"--accumulation: must be at least 1, got {args.accumulation}")
    device_name = args.device or ("cpu" if budget_bytes is not None else "auto")
    if device_name not in ("auto", "cpu", "mps") and not device_name.startswith("cuda"):
        raise ConfigError(
            f"--device: {device_name!r} is not a device of this machine (cpu, cuda, cuda:N, mps); "
            "batch-size runs real steps -- to plan for a device profile use tightfit plan --device"
        )

    from tightfit.hardware.detect import resolve_device
    from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
    from tightfit.plan import BatchSizeRequest, plan

    device = resolve_device(device_name)
    if device.type == "cpu" and budget_bytes is None:
        raise ConfigError("--memory: required on CPU (the budget to simulate, e.g. --memory 2GiB)")
    inputs = parse_input_spec(args.input)
    model = build_model(args.model, num_classes=args.num_classes)
    batch_factory = make_batch_factory(inputs, model, args.num_classes)
    model = model.to(device)
    if args.inference:
        return _run_inference(args, model, batch_factory, budget_bytes, device)
    with _status(args.json, f"searching the batch size of {args.model} on {device}"):
        result = plan(
            BatchSizeRequest(
                model,
                batch_factory,
                options=dict(
                    budget_bytes=budget_bytes,
                    device=device,
                    precision=args.precision,
                    optimizer=args.optimizer,
                    checkpointing=args.checkpointing,
                    margin=args.margin,
                    max_batch_size=args.max_batch_size,
                    accumulation_steps=args.accumulation,
                ),
            )
        )
    if args.json:
        from tightfit.cli._output import print_json

        print_json({"model": args.model, "input": args.input, "device": str(device), **result.to_dict()})
    else:
        _render(result)
    return 0 if result.batch_size > 0 else 1


def _run_inference(args, model, batch_factory, budget_bytes, device) -> int:
    from tightfit.errors import ConfigError
    from tightfit.names import INFERENCE_PRECISIONS
    from tightfit.plan import BatchSizeRequest, plan

    if args.precision not in INFERENCE_PRECISIONS:
        raise ConfigError(
            f"--precision: {args.precision} is not an inference precision ({', '.join(INFERENCE_PRECISIONS)})"
        )
    if budget_bytes is None:
        import torch

        budget_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if budget_bytes is None:
        raise ConfigError("--memory: required with --inference on this device (the budget, e.g. --memory 4GiB)")
    with _status(args.json, f"searching the forward batch size of {args.model} on {device}"):
        result = plan(
            BatchSizeRequest(
                model,
                batch_factory,
                inference=True,
                options=dict(
                    budget_bytes=budget_bytes,
                    device=device,
                    precision=args.precision,
                    margin=args.margin,
                    max_batch_size=args.max_batch_size,
                ),
            )
        )
    if args.json:
        from tightfit.cli._output import print_json

        print_json({"model": args.model, "input": args.input, "device": str(device), **result.to_dict()})
    else:
        from tightfit.cli._output import console
        from tightfit.units import format_bytes

        out = console()
        for trial in result.trials:
            peak = format_bytes(trial["peak_bytes"]) if trial["peak_bytes"] is not None else "out of memory"
            out.print(f"  forward pass at batch {trial['batch_size']}: {peak} ({trial['seconds']:.2f} s)")
        out.print(
            f"predicted: {result.predicted_batch_size}; largest forward batch: {result.batch_size} "
            f"(budget {format_bytes(result.budget_bytes)}, margin {args.margin:.0%})"
        )
    return 0 if result.batch_size > 0 else 1


def _status(quiet: bool, text: str):
    """A spinner on stderr while trials run (none with --json, whose stdout a script reads)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def _render(result) -> None:
    from rich.table import Table

    from tightfit.cli._output import console
    from tightfit.plan.search import describe
    from tightfit.units import format_bytes

    table = Table(title="trial steps (real tensors)")
    for column in ("batch size", "fits", "peak", "seconds"):
        table.add_column(column, justify="right")
    for trial in result.trials:
        peak = format_bytes(trial["peak_bytes"]) if trial["peak_bytes"] is not None else "out of memory"
        table.add_row(str(trial["batch_size"]), "yes" if trial["fits"] else "no", peak, f"{trial['seconds']:.2f}")
    out = console()
    out.print(table)
    if result.predicted_batch_size is not None:
        out.print(f"predicted: {result.predicted_batch_size}")
    for note in result.notes:
        out.print(f"  {note}")
    out.print(describe(result))
