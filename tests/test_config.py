"""The run configuration: defaults = the digits recipe, overrides, and one-line errors that name
the key, where it was set and the closest valid key, with nothing written."""

from pathlib import Path

import pytest
import yaml

import tightfit
from tightfit.cli import main
from tightfit.config import TrainConfig, default_recipe, load_config, parse_override
from tightfit.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml"


def test_the_digits_recipe_is_the_default_and_starts_with_its_command():
    assert default_recipe() == RECIPE
    assert RECIPE.read_text().splitlines()[0].startswith("# tightfit train recipes/digits.yaml")
    # an installed package has no recipes/ folder and runs the copy shipped inside it
    packaged = Path(tightfit.__file__).parent / "recipes" / "digits.yaml"
    assert packaged.read_text() == RECIPE.read_text()
    # the recipe is the defaults plus a thread count
    assert load_config(RECIPE).model_dump() == TrainConfig(threads=1).model_dump()


def test_overrides_are_typed_and_dotted():
    config = load_config(
        RECIPE, ["optimizer.lr=0.01", "epochs=5", "checkpointing=auto", "batch.micro_batch_size=auto", "budget=64MiB"]
    )
    assert config.optimizer.lr == 0.01 and config.epochs == 5
    assert config.checkpointing.activation == "auto"
    assert config.batch.micro_batch_size == "auto" and config.budget_bytes == 64 * 2**20
    assert parse_override("data.augment=[hflip, 'rotation:15']") == ("data.augment", ["hflip", "rotation:15"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("optimzer:\n  lr: 0.1\n", [], r"optimzer \(in .*run.yaml\): unknown key; did you mean 'optimizer'\?"),
        ("optimizer:\n  lrr: 0.1\n", [], r"optimizer.lrr \(in .*run.yaml\): unknown key; did you mean 'lr'\?"),
        ("data:\n  sorce: digits\n", [], r"data.sorce \(in .*run.yaml\): unknown key; did you mean 'source'\?"),
        (
            "epochs: 3\n",
            ["early_stoping.patience=2"],
            r"early_stoping \(on the command line\): unknown key; did you mean 'early_stopping'\?",
        ),
        ("epochs: many\n", [], r"epochs \(in .*run.yaml\): .*valid integer"),
        (
            "epochs: 3\n",
            ["batch.micro_batch_size=0"],
            r"batch.micro_batch_size \(on the command line\): must be a positive integer or 'auto'",
        ),
        ("precision: fp8\n", [], r"precision \(in .*run.yaml\): .*'auto', 'fp32'"),
        ("budget: 6XB\n", [], r"budget \(in .*run.yaml\): unknown unit 'XB'"),
        ("device: gpu\n", [], r"device .*unknown device 'gpu'"),
        ("optimizer:\n  lr: -1\n", [], r"optimizer.lr .*greater than 0"),
        (
            "batch:\n  micro_batch_size: 8\n  accumulation_steps: 2\n  effective_batch_size: 20\n",
            [],
            r"8 x accumulation_steps 2 != effective_batch_size 20",
        ),
        ("schedule:\n  name: cosin\n", [], r"schedule.name .*'cosine'"),
        ("lora:\n  rank: x\n", [], r"lora.rank .*valid integer"),
    ],
)
def test_bad_settings_name_the_key_where_and_the_closest_valid_key(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), overrides)


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2"):
        load_config(write(tmp_path, "epochs: 3\n  bad: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="epochs is a value, not a section"):
        load_config(write(tmp_path, "epochs: 3\n"), ["epochs.max=3"])


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = write(tmp_path, f"run_dir: {run_dir}\noptimizer:\n  nme: sgd\n")
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("tightfit train: error: optimizer.nme (in ") and "did you mean 'name'" in error
    assert not run_dir.exists()
    assert main(["train", str(path), "extra-positional"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_an_existing_run(tmp_path, capsys):
    (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    marker = tmp_path / "checkpoints" / "last" / "meta.json"
    marker.write_text("{}")
    assert main(["train", "--run-dir", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert marker.read_text() == "{}"


def test_print_config_shows_the_resolved_config(tmp_path, capsys):
    assert main(["train", "--print-config", "epochs=3", "--set", "optimizer.name=sgd", "--limit", "50"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 3 and printed["optimizer"]["name"] == "sgd" and printed["data"]["limit"] == 50
    assert printed["schedule"]["name"] == "cosine" and "early_stopping" in printed  # defaults filled in
    assert main(["train", "--print-config", "--json"]) == 0
    assert '"model": "builtin:digits-cnn"' in capsys.readouterr().out
