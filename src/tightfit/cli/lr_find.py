"""``tightfit lr-find``: the learning-rate range test on a recipe, without training it."""

import argparse

HELP = "find a learning rate for a recipe: the range test (Smith 2015) on its own steps"
DESCRIPTION = """\
Sweep the learning rate exponentially over real optimizer steps of the recipe's own training
step, record the loss, and suggest the rate at the steepest descent of the smoothed loss (the
rule is in docs/train.md). Nothing is trained: the weights are put back and no run folder is
left. Use the rate with optimizer.lr=..., or let a run find it itself with optimizer.lr=auto.

examples:
  tightfit lr-find                                   # the digits recipe
  tightfit lr-find recipes/digits.yaml --plot lr.png
  tightfit lr-find my.yaml lr_find.min_lr=1e-6 lr_find.num_steps=200 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="a recipe file (first), then overrides such as lr_find.max_lr=0.1",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="an override (repeatable)"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="draw the loss against the rate, with the suggestion, to this PNG"
    )
    parser.add_argument("--json", action="store_true", help="print the sweep and the suggestion as JSON")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the recipe name a module.path:callable model (runs its Python code)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tightfit.cli.train import _split_items
    from tightfit.config import default_recipe, load_config

    config_path, overrides = _split_items(args.items)
    config = load_config(config_path or default_recipe(), overrides + args.overrides, trust_code=args.trust_code)
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        from tightfit.errors import ConfigError

        if plot_path.suffix.lower() != ".png":
            raise ConfigError(f"--plot {args.plot}: expected a .png file name")
        if not plot_path.parent.is_dir():
            raise ConfigError(f"--plot {args.plot}: the folder {plot_path.parent} does not exist")
        if plot_path.is_dir():
            raise ConfigError(f"--plot {args.plot}: is a folder; give the name of the .png file to write")

    from tightfit.api import lr_find
    from tightfit.cli._output import console
    from tightfit.training.lr_finder import plot_lr_find

    if args.json:
        config = config.model_copy(update={"logging": config.logging.model_copy(update={"console": False})})
    result = lr_find(config, progress=not args.json)
    if plot_path is not None:
        plot_lr_find(result, plot_path)
    if args.json:
        from tightfit.cli._output import print_json

        print_json({**result.to_dict(), "plot": str(plot_path) if plot_path else None})
        return 0 if result.suggestion is not None else 1
    output = console()
    ran = f"{len(result.lrs)} steps from {result.min_lr:.2g} to {result.lrs[-1]:.2g}" if result.lrs else "no step"
    ending = "; stopped when the loss diverged" if result.stopped_early else ""
    output.print(f"range test: {ran}{ending}", soft_wrap=True)
    if result.suggestion is None:
        output.print(f"no suggestion: {result.reason}", soft_wrap=True, markup=False)
    else:
        output.print(
            f"suggested learning rate: {result.suggestion:.3g} ({result.reason})", soft_wrap=True, markup=False
        )
        output.print(
            f"use it: tightfit train {config_path or ''} optimizer.lr={result.suggestion:.3g}".replace("  ", " "),
            soft_wrap=True,
            markup=False,
        )
    if plot_path is not None:
        output.print(f"plot: {plot_path}", soft_wrap=True)
    return 0 if result.suggestion is not None else 1
