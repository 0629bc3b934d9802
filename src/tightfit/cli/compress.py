"""``tightfit compress``: prune, distill, quantize and export a trained model, measuring each step."""

HELP = "shrink a trained model: prune, distill, qat, quantize, export — and measure every step"
DESCRIPTION = """\
Shrink a trained model and measure what each step bought: size on disk, parameters and non-zeros,
latency (median and p90 at batch 1 and a larger batch, threads stated), throughput, and the task
metric on the held-out split. Steps slower than the original or losing more than --tolerance
points are flagged; the best artifact is named. Writes OUTPUT/report.json, two PNG plots and one
folder per step.

examples:
  tightfit compress runs/digits                                  # prune -> quantize -> export
  tightfit compress runs/digits --recipe recipes/compress-digits.yaml
  tightfit compress runs/digits --steps prune,quantize --sparsity 0.7 --structured
  tightfit compress builtin:digits-cnn --checkpoint runs/digits/checkpoints/best --data digits
"""

from tightfit.names import QUANTIZE_METHODS


def add_arguments(parser) -> None:
    parser.add_argument("source", help="a tightfit run directory, or a model spec (with --checkpoint and --data)")
    parser.add_argument("--recipe", help="a compression recipe YAML (default: prune -> quantize -> export)")
    parser.add_argument(
        "--steps", help="comma-separated steps instead of a recipe: prune,finetune,distill,qat,quantize,export"
    )
    parser.add_argument("--sparsity", type=float, help="prune steps: final sparsity / channel ratio (default 0.5)")
    parser.add_argument(
        "--structured", action="store_true", help="prune steps: remove channels/heads instead of zeroing weights"
    )
    parser.add_argument("--quantize-method", choices=QUANTIZE_METHODS, help="quantize steps: the method")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs inside steps (default 3)")
    parser.add_argument(
        "--tolerance", type=float, help="metric points a step may lose before it is flagged (default 1)"
    )
    parser.add_argument("--threads", type=int, help="threads for latency measurement (default: physical cores)")
    parser.add_argument("--device", help="where fine-tuning runs (cpu, cuda, mps); measuring is always on CPU")
    parser.add_argument(
        "--checkpoint", help="with a model spec: its weights (model.safetensors or a checkpoint folder)"
    )
    parser.add_argument("--data", help="with a model spec: a data YAML file or a data source name (digits)")
    parser.add_argument("--output", "-o", help="output folder (default: SOURCE/compressed for a run directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in the output folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the run's config.yaml or the recipe name a module.path:callable model (runs its Python code)",
    )


def _recipe_tree(args) -> dict:
    """The recipe as a dict: the file (or defaults) with the command-line options applied."""

    from tightfit.compression.recipe import Recipe, load_recipe, steps_from_names
    from tightfit.errors import ConfigError

    if args.recipe and args.steps:
        raise ConfigError("compress: give either --recipe or --steps, not both")
    tree = (
        load_recipe(args.recipe, trust_code=args.trust_code).model_dump(mode="json", exclude_unset=False)
        if args.recipe
        else Recipe().model_dump(mode="json")
    )
    if args.steps:
        tree["steps"] = steps_from_names(args.steps)
    for step in tree["steps"]:
        if step["step"] == "prune":
            if args.sparsity is not None:
                step["sparsity"] = args.sparsity
            if args.structured:
                step["method"] = "structured"
        if step["step"] == "quantize" and args.quantize_method:
            step["method"] = args.quantize_method
    for option, key in (("tolerance", "tolerance"), ("threads", "threads"), ("device", "device")):
        if getattr(args, option) is not None:
            tree[key] = getattr(args, option)
    if args.epochs is not None:
        tree["finetune"]["epochs"] = args.epochs
    return tree


def run(args) -> int:
    from pathlib import Path

    from tightfit.cli._output import console, print_json
    from tightfit.compression.pipeline import compress, load_source
    from tightfit.compression.recipe import build_recipe
    from tightfit.errors import ConfigError

    recipe = build_recipe(_recipe_tree(args), source=args.recipe or "(command line)")
    source_path = Path(args.source)
    if not source_path.is_dir() and ":" not in args.source:
        raise ConfigError(
            f"compress: {args.source} is neither a run directory nor a model spec (builtin:NAME, hf:DIR, ...)"
        )
    if source_path.is_dir():
        output = Path(args.output) if args.output else source_path / "compressed"
    elif args.output:
        output = Path(args.output)
    else:
        raise ConfigError("compress: with a model spec, give --output")
    if (output / "report.json").exists() and not args.overwrite:
        raise ConfigError(f"compress: {output} already holds a report; choose another --output or pass --overwrite")
    source = load_source(args.source, checkpoint=args.checkpoint, data=args.data, trust_code=args.trust_code)
    screen = None if args.json else console()
    if screen is not None and not screen.is_terminal:
        screen.width = max(screen.width, 180)  # the table is wide; do not wrap it in logs
    report = compress(
        source,
        recipe,
        output,
        console=screen,
        progress=screen is not None and screen.is_terminal,
        overwrite=args.overwrite,
        trust_code=args.trust_code,
    )
    if args.json:
        import sys

        for note in source.notes:  # the table's warnings, kept off stdout, which holds the JSON
            print(f"tightfit compress: warning: {note}", file=sys.stderr)
        print_json(report)
    return 0
