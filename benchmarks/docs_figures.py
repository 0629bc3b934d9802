"""Regenerate the command output quoted in the docs (``make docs-figures``), so figures come from one source.

A quoted block in docs/*.md is a fenced block whose first line is ``$ tightfit ARGS`` and whose
other lines are the *last lines* of what that command prints. This script runs every command
listed in :data:`QUOTED` and rewrites its block with the command's current last lines;
``--check`` only compares, and exits 1 naming each block that drifted. Timings (``3.7 s``) are
compared as ``<time>``: they change from run to run and machine to machine, so the check holds
the counts and sizes, not the seconds (the docs say the machine was loaded).
``tests/test_first_hour.py`` runs the check on the fast blocks.

    python benchmarks/docs_figures.py            # rewrite the blocks
    python benchmarks/docs_figures.py --check    # compare only
"""

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUOTED = {
    "docs/memory.md": ["batch-size --model builtin:digits-cnn --input 1x8x8 --memory 16MiB"],
}
"""doc -> the commands whose output it quotes (as written after ``$ tightfit``)."""
TIMING = re.compile(r"\b\d+(\.\d+)? (s|ms|min)\b")


def masked(line: str) -> str:
    """A line with its timings replaced by ``<time>``."""
    return TIMING.sub("<time>", line.rstrip())


def command_output(command: str) -> list[str]:
    """What ``tightfit COMMAND`` prints (stdout), as lines, run in this process."""
    import os

    from tightfit.cli import main

    os.environ.setdefault("COLUMNS", "110")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(command.split())
    if code != 0:
        raise RuntimeError(f"tightfit {command}: exit code {code}")
    return [line.rstrip() for line in stdout.getvalue().splitlines() if line.strip()]


def quoted_block(text: str, command: str) -> tuple[int, int]:
    """``(start, end)`` line indexes of the block's output lines (after the ``$`` line, before the fence)."""
    lines = text.splitlines()
    start = lines.index(f"$ tightfit {command}") + 1
    end = next(index for index in range(start, len(lines)) if lines[index].startswith("```"))
    return start, end


def drifted(doc: str, command: str, output: list[str]) -> tuple[list[str], list[str]] | None:
    """``(quoted, current)`` when the block no longer matches the output's last lines, else None."""
    text = (ROOT / doc).read_text()
    start, end = quoted_block(text, command)
    quoted = text.splitlines()[start:end]
    current = output[-len(quoted) :]
    return None if [masked(line) for line in quoted] == [masked(line) for line in current] else (quoted, current)


def rewrite(doc: str, command: str, output: list[str]) -> None:
    text = (ROOT / doc).read_text()
    lines = text.splitlines()
    start, end = quoted_block(text, command)
    lines[start:end] = output[-(end - start) :]
    (ROOT / doc).write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a block drifted")
    args = parser.parse_args()
    problems = 0
    for doc, commands in QUOTED.items():
        for command in commands:
            output = command_output(command)
            found = drifted(doc, command, output)
            if found is None:
                print(f"{doc}: tightfit {command}: up to date")
            elif args.check:
                problems += 1
                print(f"{doc}: tightfit {command}: drifted\n  quoted:  {found[0]}\n  current: {found[1]}")
            else:
                rewrite(doc, command, output)
                print(f"{doc}: tightfit {command}: rewritten")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
