"""``tightfit train``: train a model from a YAML recipe (default: the built-in digits recipe)."""

import argparse

HELP = "train a model from a YAML recipe (no arguments: the built-in digits recipe)"
DESCRIPTION = """\
Train a model as a YAML recipe describes, with key=value overrides.

examples:
  tightfit train                                   # the digits recipe (timings and accuracy: docs/train.md)
  tightfit train recipes/digits.yaml optimizer.lr=0.01 epochs=5
  tightfit train optimizer.lr=auto                 # the learning-rate range test picks the rate first
  tightfit train my.yaml --set batch.micro_batch_size=auto --set budget=4GiB
  tightfit train --resume runs/20260101-120000     # continue a stopped run exactly
  tightfit train my.yaml --print-config            # show every setting, defaults filled in
  tightfit train my.yaml --nproc-per-node 4 distributed.strategy=fsdp   # 4 processes on this machine
  torchrun --nproc-per-node 4 -m tightfit train my.yaml                 # the same, through torchrun

several machines: torchrun on each (--nnodes, --rdzv-endpoint); see docs/distributed.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="a recipe file (first), then overrides such as optimizer.lr=0.01",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="an override (repeatable)"
    )
    parser.add_argument("--run-dir", help="where the run is written (default: a new folder under runs/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint, exactly")
    parser.add_argument(
        "--retest",
        action="store_true",
        help="with --resume on a finished run: test its result again (default: say it is complete and stop)",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="use at most N samples per split (a quick trial; data.limit)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train with N processes on this machine (one per GPU), through torchrun's launcher",
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the recipe or the run's config.yaml name a module.path:callable model (runs its Python code)",
    )


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from tightfit.config import config_to_yaml, default_recipe, load_config
    from tightfit.errors import ConfigError

    config_path, overrides = _split_items(args.items)
    overrides += args.overrides
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    if args.resume:
        if config_path is not None:
            raise ConfigError("--resume: the run's own config.yaml is used; give overrides only, not a recipe file")
        resume_config = Path(args.resume) / "config.yaml"
        if not resume_config.is_file():
            raise ConfigError(f"--resume: {args.resume} is not a tightfit run directory (no config.yaml)")
        config = load_config(resume_config, overrides, trust_code=args.trust_code)
    else:
        config = load_config(config_path or default_recipe(), overrides, trust_code=args.trust_code)
    if args.print_config:
        if args.json:
            from tightfit.cli._output import print_json

            print_json(config.model_dump(mode="json"))
        else:
            print(config_to_yaml(config), end="")
        return 0
    if not args.resume and config.run_dir:
        from tightfit.runs.run_folder import check_new_run_folder

        check_new_run_folder(config.run_dir)

    if args.resume and not args.retest:
        complete = _complete_run(Path(args.resume), config)
        if complete is not None:
            print(complete)
            return 0
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        return _launch(args)  # the configuration is valid: now start the processes
    from tightfit.report.callback import report_callbacks
    from tightfit.training.trainer import Trainer

    if args.json:
        config = config.model_copy(update={"logging": config.logging.model_copy(update={"console": False})})
    summary = Trainer(config, callbacks=report_callbacks(config)).fit(resume_from=args.resume)
    if "WORLD_SIZE" in os.environ:
        import gc

        # free the sharded model (and what it holds of the process group fit() destroyed) now,
        # while the interpreter is whole, not in its shutdown
        gc.collect()
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports for every rank (the summary holds each rank's peak)
    metrics_file = Path(summary["run_dir"]) / "metrics.jsonl"
    # drawn here rather than in fit(), which a notebook or benchmark calls: matplotlib costs a second
    if metrics_file.is_file():
        from tightfit.training.plots import plot_curves

        plot_curves(metrics_file, Path(summary["run_dir"]) / "curves.png")
        sweep_file = Path(summary["run_dir"]) / "lr_find.json"
        if sweep_file.is_file():  # optimizer.lr: auto
            import json

            from tightfit.training.lr_finder import LRFindResult, plot_lr_find

            plot_lr_find(LRFindResult(**json.loads(sweep_file.read_text())), sweep_file.with_suffix(".png"))
    if args.json:
        from tightfit.cli._output import print_json

        print_json(summary)
    else:
        _print_summary(summary)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Run this same command in ``--nproc-per-node`` processes with torchrun's launcher.

    The launcher (``torch.distributed.run``) starts the processes with their rank environment,
    watches them, and when one dies stops the others, so a failure never leaves a hang behind.
    """
    from tightfit.errors import ConfigError, DistributedRunError

    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: must be a positive integer, got {args.nproc_per_node}")
    command = ["train", *args.items]
    for override in args.overrides:
        command += ["--set", override]
    for flag, value in (("--run-dir", args.run_dir), ("--resume", args.resume), ("--limit", args.limit)):
        if value is not None:
            command += [flag, str(value)]
    for flag in ("json", "trust_code"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(args.nproc_per_node), "--module", "tightfit", *command]
    )
    try:
        run(launcher_args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        others = sorted(set(error.failures) - {rank})
        stopped = f"; rank(s) {', '.join(map(str, others))} stopped with it" if others else ""
        raise DistributedRunError(
            f"rank {rank} failed first ({_exit_reason(failure.exitcode)}){stopped}; its messages are above. "
            "Continue from the last checkpoint with --resume RUN_DIR"
        ) from None
    return 0


def _exit_reason(exit_code: int) -> str:
    """``exit code 1``, or ``killed by SIGKILL`` for a negative (signal) exit code."""
    if exit_code >= 0:
        return f"exit code {exit_code}"
    import signal

    try:
        return f"killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"signal {-exit_code}"


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The recipe file (an item without '=' in first place) and the key=value overrides."""
    from tightfit.errors import ConfigError

    config_path = None
    overrides = []
    for position, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif position == 0:
            config_path = item
        else:
            raise ConfigError(f"{item!r}: expected key=value after the recipe file (e.g. epochs=5)")
    return config_path, overrides


def _complete_run(run_dir, config) -> str | None:
    """The line to print for ``--resume`` on a run that already finished (its summary written,
    its last checkpoint at the end of the last epoch, at max_steps, or stopped early), else None."""
    import json

    from tightfit.runs.checkpoint import is_intact

    last = run_dir / "checkpoints" / "last"
    summary_file, meta_file = run_dir / "summary.json", last / "meta.json"
    if not summary_file.is_file() or not meta_file.is_file() or not is_intact(last):
        return None  # damaged or tampered with: the trainer's own checks say what is wrong
    try:
        summary, meta = json.loads(summary_file.read_text()), json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # damaged: the trainer's own checks say what is wrong
    at_end = meta.get("epoch_finished") and meta.get("epoch", -1) + 1 >= config.epochs
    at_max = config.max_steps is not None and meta.get("step", 0) >= config.max_steps
    if not (at_end or at_max or summary.get("stop_reason")):
        return None
    result = {key: summary[key] for key in ("test_accuracy", "test_loss", "train_loss") if summary.get(key) is not None}
    figures = ", ".join(f"{key} {value:.4f}" for key, value in result.items())
    return (
        f"{run_dir}: already complete ({summary.get('steps')} steps, {summary.get('epochs')} epochs"
        f"{'; ' + figures if figures else ''}); nothing to resume. Raise epochs= or max_steps= to train on, "
        "or add --retest to test it again"
    )


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from tightfit.cli._output import console
    from tightfit.units import format_bytes

    table = Table(title="tightfit train: summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("test_accuracy", "test_top5_accuracy", "test_loss"):
        if key in summary:
            table.add_row(key, f"{summary[key]:.4f}")
    best = summary.get("best_metric")
    if best:
        table.add_row(f"best {best['name']}", f"{best['value']:.4f}")
    if summary.get("train_loss") is not None:
        table.add_row("train_loss (last 20 steps)", f"{summary['train_loss']:.4f}")
    table.add_row("steps / epochs", f"{summary['steps']} / {summary['epochs']}")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s ({summary['samples_per_s']:.0f} samples/s)")
    for rank, peaks in enumerate(summary["peak_memory_bytes_per_rank"]):
        label = "peak memory" if summary["world_size"] == 1 else f"peak memory, rank {rank}"
        table.add_row(label, ", ".join(f"{name} {format_bytes(value)}" for name, value in peaks.items() if value))
    table.add_row("precision", f"{summary['precision']} on {summary['device']}")
    if summary["world_size"] > 1:
        table.add_row("processes", f"{summary['world_size']} ({summary['strategy']})")
    table.add_row(
        "batch",
        f"micro {summary['micro_batch_size']} x {summary['accumulation_steps']} = {summary['effective_batch_size']}"
        + (f" (after {summary['oom_recoveries']} out-of-memory recoveries)" if summary["oom_recoveries"] else ""),
    )
    if summary.get("skipped_steps"):
        table.add_row("skipped steps", str(summary["skipped_steps"]))
    if summary.get("stop_reason"):
        table.add_row("stopped", summary["stop_reason"])
    output = console()
    output.print(table)
    # paths on their own lines: a narrow terminal would ellipsise them inside the table
    for finding in summary.get("diagnosis") or []:
        output.print(
            f"diagnosis: {finding['finding']}: {finding['evidence']}; {finding['advice']}", soft_wrap=True, markup=False
        )
    if summary.get("best_checkpoint"):
        output.print(f"best checkpoint: {summary['best_checkpoint']}", soft_wrap=True)
    else:
        output.print(
            f"result: {summary['result_checkpoint']} (the last checkpoint: no validation split, so no best)",
            soft_wrap=True,
        )
    output.print(f"run written to: {summary['run_dir']}", soft_wrap=True)
    if summary.get("report"):
        output.print(f"report: {summary['report']}", soft_wrap=True)
