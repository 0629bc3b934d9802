"""The command-line shell: registry, help without torch, exit codes; memory-size parsing."""

import subprocess
import sys
import time

import pytest

from conftest import run_tightfit
from tightfit.errors import SpecError
from tightfit.units import format_bytes, parse_memory


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6GiB", 6 * 2**30),
        ("6 GB", 6 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512mb", 512 * 10**6),
        ("1.5G", int(1.5 * 2**30)),
        ("1024", 1024),
        (2048, 2048),
    ],
)
def test_parse_memory_accepts_common_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "six GB", "6XB", "-1GiB", "0", "GiB", "6 G iB"])
def test_parse_memory_rejects_bad_strings_with_the_place_named(text):
    with pytest.raises(SpecError, match="--memory"):
        parse_memory(text, where="--memory")


def test_format_bytes_uses_binary_units():
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(None) == "-"


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from tightfit.cli import main\n"
        "for argv in (['--help'], *[[name, '--help'] for name in __import__('tightfit.cli').cli.COMMANDS]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"--help imported {result.stdout.strip()}"


def test_help_answers_quickly():
    start = time.perf_counter()
    result = run_tightfit("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    assert "usage: tightfit" in result.stdout
    # Generous bound for a loaded CI machine; measured ~0.1 s idle (see README).
    assert elapsed < 3.0


def test_unknown_command_exits_2():
    result = run_tightfit("no-such-command")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_no_command_prints_help_and_exits_2():
    result = run_tightfit()
    assert result.returncode == 2
    assert "usage: tightfit" in result.stdout
