"""The ``tightfit`` command line: one registry of sub-commands, one small module per command.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``
and imports nothing heavy at module level, so ``tightfit --help`` and ``tightfit COMMAND --help``
never import torch.
"""

import argparse
import importlib
import logging
import sys
import warnings

from tightfit import __version__
from tightfit.errors import TightfitError

# name -> module; the order is the order of ``tightfit --help``.
COMMANDS = {
    "doctor": "tightfit.cli.doctor",
    "devices": "tightfit.cli.devices",
    "plan": "tightfit.cli.plan",
    "batch-size": "tightfit.cli.batch_size",
    "train": "tightfit.cli.train",
    "lr-find": "tightfit.cli.lr_find",
    "export-checkpoint": "tightfit.cli.export_checkpoint",
    "compress": "tightfit.cli.compress",
    "predict": "tightfit.cli.predict",
    "lora": "tightfit.cli.lora",
    "generate": "tightfit.cli.generate",
    "run": "tightfit.cli.run",
    "report": "tightfit.cli.report",
}


# Third-party loggers that warn at import about things a tightfit user cannot act on: the
# bitsandbytes CPU 4-bit kernel from the `kernels` hub package (it would download), diffusers'
# torchao checkpoint types, and torchao's deprecated pytree registrations. The command line is the
# application, so it quiets them; library users keep their own logging configuration.
_NOISY_IMPORT_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "torch.utils._pytree",
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(error: Exception) -> str:
    """An error's message on one line. A DataLoader worker re-raises a worker's error with the
    worker's traceback inside the message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."); the user's message is its last line, after the class name."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="tightfit",
        description="Train, fine-tune and shrink PyTorch models on the hardware you actually have.",
    )
    parser.add_argument("--version", action="version", version=f"tightfit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a command whose module is not written yet is simply not offered
        command_parser = subparsers.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # key=value overrides may follow options (train CONFIG --run-dir R epochs=3), which argparse
    # leaves over once a positional list has been consumed
    if extras and hasattr(args, "items") and all("=" in item and not item.startswith("-") for item in extras):
        args.items += extras
    elif extras:
        where = f"tightfit {args.command}" if args.command else "tightfit"
        print(f"{where}: error: unrecognized arguments: {' '.join(extras)} (see {where} --help)", file=sys.stderr)
        return 2
    for name in _NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every LoRA model.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except TightfitError as error:
        print(f"tightfit {args.command}: error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"tightfit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`tightfit devices --json | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
