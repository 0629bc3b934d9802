"""The README's QLoRA 7B table is what ``tightfit plan`` says about the shipped recipes, and every
row fits its machine."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


def _table_module():
    spec = importlib.util.spec_from_file_location("qlora_recipes_table", REPO / "benchmarks" / "qlora_recipes_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # four 7B plans on fake tensors: about 25 s each on an idle 2-core machine
def test_readme_qlora_table_is_regenerated_by_plan_and_every_row_fits():
    module = _table_module()
    generated = module.table()
    readme = module.README.read_text()
    assert module.with_table(readme, generated) == readme, (
        "README's QLoRA table is stale: benchmarks/qlora_recipes_table.py --write"
    )
    rows = [line for line in generated.splitlines()[2:]]
    assert len(rows) == len(module.ROWS) and all("| ✓ |" in line for line in rows)
    rtx3050 = next(line for line in rows if line.startswith("| rtx3050-laptop-6gb "))
    assert float(rtx3050.split("|")[6].split(" of ")[0]) <= 5.0  # Unsloth's published minimum for 7B QLoRA


def test_the_table_is_written_between_its_markers_only():
    module = _table_module()
    text = f"before\n{module.BEGIN}\nold\n{module.END}\nafter\n"
    assert module.with_table(text, "new") == f"before\n{module.BEGIN}\nnew\n{module.END}\nafter\n"
