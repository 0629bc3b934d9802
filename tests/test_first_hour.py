"""A newcomer's first hour (issue 24): `auto` keeps the recipe's training, recipes and runs work
from any folder, merged and compressed artifacts open as a library expects, good ends."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from tightfit.cli import main
from tightfit.config import load_config
from tightfit.plan.search import micro_batch_dividing
from tightfit.training.diagnosis import flat_loss_finding

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
QUIET = ["logging.console=false", "logging.progress=false", "logging.tensorboard=false", "monitor.enabled=false"]


# ------------------------------------------------------------------ 1. auto keeps the training
def test_readme_auto_example_keeps_the_effective_batch_and_the_accuracy(tmp_path):
    """`tightfit train recipes/digits.yaml optimizer.lr=0.01 batch.micro_batch_size=auto budget=64MiB`
    used to pick a micro-batch of 629 (0.8885). Seeds 0-5 now give 0.9963, 0.9888, 0.9926, 1.0,
    0.9888, 0.9926 (min 0.9888), so 0.98 holds with margin."""
    from tightfit.training.trainer import Trainer

    overrides = [
        "optimizer.lr=0.01",
        "batch.micro_batch_size=auto",
        "budget=64MiB",
        f"run_dir={tmp_path / 'run'}",
        *QUIET,
    ]
    summary = Trainer(load_config(RECIPES / "digits.yaml", overrides)).fit()
    assert summary["effective_batch_size"] == 64
    assert summary["micro_batch_size"] * summary["accumulation_steps"] == 64
    assert "effective batch from none stated" in summary["batch_reason"]
    assert summary["test_accuracy"] >= 0.98


def test_auto_takes_the_largest_fitting_divisor_of_the_effective_batch():
    assert micro_batch_dividing(64, 629) == 64  # capped at the effective batch
    assert micro_batch_dividing(64, 40) == 32  # 40 fits, 32 divides 64: two equal micro-batches
    assert micro_batch_dividing(96, 40) == 32
    assert micro_batch_dividing(61, 40) == 40  # a prime: 1 would be 61 passes; the last one is smaller
    assert micro_batch_dividing(64, 1) == 1


def test_the_diagnosis_names_a_batch_the_recipe_did_not_set_before_the_learning_rate():
    losses = [2.3 + 0.01 * ((index * 7) % 5 - 2) for index in range(40)]
    plain = flat_loss_finding(losses, first_step=1, lr=1e-6)
    changed = flat_loss_finding(losses, first_step=1, lr=1e-6, batch_note="none stated: the default micro-batch 64")
    assert plain["advice"].startswith("the learning rate is likely too low")
    assert changed["advice"].startswith("first check the batch")
    assert changed["advice"].index("batch") < changed["advice"].index("learning rate")


# ------------------------------------------------------------------ 2. paths from anywhere
@pytest.mark.parametrize("recipe", ["digits.yaml", "causal-lm-base.yaml", "lora-causal-lm.yaml"])
def test_shipped_recipes_plan_from_another_folder(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(RECIPES / recipe), "--device", "m1-16gb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_a_recipe_trains_from_another_folder_and_the_moved_run_generates_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            str(RECIPES / "causal-lm-base.yaml"),
            "max_steps=2",
            "data.limit=16",
            "--run-dir",
            "runs/base",
            *QUIET,
        ]
    )
    assert code == 0
    capsys.readouterr()
    saved = (tmp_path / "runs" / "base" / "config.yaml").read_text()
    assert "hf:packaged:tiny-llama" in saved and "run_dir: ." in saved  # nothing tied to the folder it ran in
    moved = tmp_path / "elsewhere" / "base"
    moved.parent.mkdir()
    shutil.move(tmp_path / "runs" / "base", moved)
    monkeypatch.chdir(moved.parent)
    assert main(["generate", str(moved), "--prompt", "What colour is grass?", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1
    assert main(["train", "--resume", str(moved)]) == 0  # finished: said, not trained or tested again
    assert "already complete" in capsys.readouterr().out
    assert main(["train", "--resume", str(moved), "max_steps=3", *QUIET]) == 0  # raised: trains on, in place
    assert json.loads((moved / "summary.json").read_text())["steps"] == 3


@pytest.fixture(scope="module")
def compressed_moved_run(tmp_path_factory) -> Path:
    """A digits run trained in one folder, moved to another, then compressed (export only) from a third."""
    from tightfit.training.trainer import Trainer

    root = tmp_path_factory.mktemp("moved-run")
    Trainer(load_config(None, ["epochs=8", "threads=1", f"run_dir={root / 'run'}", *QUIET])).fit()
    moved = root / "moved"
    shutil.move(root / "run", moved)
    recipe = root / "export.yaml"
    recipe.write_text("steps:\n  - step: export\nrepeats: 5\nwarmup: 1\nthreads: 1\n")
    (root / "cwd").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "cwd")
        assert main(["compress", str(moved), "--recipe", str(recipe), "--output", str(root / "out")]) == 0
    return root / "out"


def test_a_moved_digits_run_compresses(compressed_moved_run):
    report = json.loads((compressed_moved_run / "report.json").read_text())
    assert report["artifacts"] and report["artifacts"][0]["metric"]["value"] > 90


def test_recipe_paths_are_relative_to_the_file_and_command_line_paths_to_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "data").mkdir(parents=True)
    recipe = tmp_path / "project" / "my.yaml"
    recipe.write_text("data:\n  source: csv\n  path: data/table.csv\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(recipe, ["init_weights=runs/base"])
    assert config.data.path == str(tmp_path / "project" / "data" / "table.csv")
    assert config.init_weights == str(tmp_path / "runs" / "base")


def test_hf_names_resolve_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from tightfit.models.spec import build_model

    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(ROOT / "src" / "tightfit" / "configs" / "tiny-llama", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    model = build_model("hf:tiny-org/tiny-llama")
    assert isinstance(model, transformers.LlamaForCausalLM) and model.config.hidden_size == 128
    config = load_config(None, ["model=hf:tiny-org/tiny-llama"])  # a repo id is not made a path
    assert config.model == "hf:tiny-org/tiny-llama"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(Exception, match="no config.json"):
        build_model("hf:tiny-org/tiny-llama")


# ------------------------------------------------------------------ 3. artifacts a library opens
def test_predict_prepares_a_black_on_white_drawing_as_the_digits_were(compressed_moved_run, tmp_path, capsys):
    from PIL import Image, ImageDraw

    capsys.readouterr()
    drawing = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(drawing).ellipse((55, 30, 145, 170), outline="black", width=14)  # a 0, as a user draws it
    drawing.save(tmp_path / "zero.png")
    assert main(["predict", str(compressed_moved_run), str(tmp_path / "zero.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predictions"][0]["top"][0]["name"] == "0"
    Image.new("RGB", (200, 200), "white").save(tmp_path / "blank.png")  # nothing like a digit
    assert main(["predict", str(compressed_moved_run), str(tmp_path / "blank.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] and "unreliable" in captured.err


# ------------------------------------------------------------------ 5. good ends
def test_a_run_without_validation_ends_on_last_with_a_train_loss(tmp_path, capsys):
    overrides = ["epochs=1", "data.limit=100", "data.val_fraction=0", "threads=1", f"run_dir={tmp_path / 'run'}"]
    assert main(["train", *overrides, "logging.progress=false", "logging.tensorboard=false"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint: None" not in out and "result:" in out and "train_loss" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["result_checkpoint"].endswith("last") and summary["train_loss"] > 0
    assert (
        main(
            [
                "export-checkpoint",
                str(tmp_path / "run"),
                "--checkpoint",
                "last",
                "--output",
                str(tmp_path / "w.safetensors"),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out and (tmp_path / "w.safetensors").is_file()
    assert main(["export-checkpoint", str(tmp_path / "run"), "--checkpoint", "last"]) == 0
    assert "already one safetensors file" in capsys.readouterr().out


# ------------------------------------------------------------------ 7. what the anchors' users expect
@pytest.mark.parametrize(
    ("alias", "name"), [("16-mixed", "fp16"), ("bf16-mixed", "bf16"), ("32-true", "fp32"), ("bf16-true", "bf16-pure")]
)
def test_lightning_precision_names_are_aliases(alias, name):
    assert load_config(None, [f"precision={alias}"]).precision == name


def test_the_wandb_logger_is_offline_by_default_and_logs_lightning_style_names(tmp_path, monkeypatch):
    from tightfit.training.trainer import Trainer

    calls = {"init": [], "log": [], "config": {}, "finished": False}

    class Run:
        name = "run"
        config = types.SimpleNamespace(update=lambda params, allow_val_change: calls["config"].update(params))

        def log(self, metrics, step):
            calls["log"].append((step, metrics))

        def log_artifact(self, artifact):
            pass

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    fake.Artifact = lambda name, type: types.SimpleNamespace(add_dir=lambda path: None, add_file=lambda path: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Trainer(
        load_config(
            None, ["epochs=1", "data.limit=100", "threads=1", "logging.wandb=true", f"run_dir={tmp_path}", *QUIET]
        )
    ).fit()
    assert calls["init"][0]["mode"] == "offline" and calls["init"][0]["dir"] == str(tmp_path)
    assert calls["config"]["optimizer.lr"] == 0.003 and calls["finished"]
    logged = {key for _, metrics in calls["log"] for key in metrics}
    assert {"train/loss", "val/loss", "test/accuracy"} <= logged


# ------------------------------------------------------------------ 4. one answer per question
def test_equal_time_precisions_resolve_to_the_safer_one_in_training_and_inference_plans(capsys):
    """m1-16gb runs fp16 and fp32 at the same rate: the plan used to recommend fp16 beside its own 1.00x."""
    assert main(["plan", "--model", "builtin:digits-cnn", "--input", "1x8x8", "--device", "m1-16gb", "--json"]) == 0
    training = json.loads(capsys.readouterr().out)
    tied = [option for option in training["alternatives"] if option["precision"] == "fp16" and option["fits"]]
    assert tied and tied[0]["note"] == "1.00x time per sample"
    assert training["recommendation"]["precision"] == "fp32"
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--inference",
                "--device",
                "m1-16gb",
                "--json",
            ]
        )
        == 0
    )
    inference = json.loads(capsys.readouterr().out)
    assert inference["precision"] == "fp32" and "ties to the safer" in inference["precision_reason"]
    assert "fp16" in inference["precision_reason"]  # it was searched, not skipped
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--inference",
                "--device",
                "rtx3050-laptop-6gb",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["precision"] in ("bf16", "fp16")  # a GPU where half precision is faster


# ------------------------------------------------------------------ 6. figures from one source
def test_the_quoted_batch_size_output_in_the_docs_is_what_the_command_prints():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import docs_figures
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for doc, commands in docs_figures.QUOTED.items():
        for command in commands:
            assert docs_figures.drifted(doc, command, docs_figures.command_output(command)) is None, (doc, command)
    assert docs_figures.masked("1 trial step, 3.7 s") == "1 trial step, <time>"


def test_counts_have_the_right_plural():
    from tightfit.units import plural

    assert (plural(1, "estimate"), plural(8, "estimate"), plural(1, "data-loader worker")) == (
        "1 estimate",
        "8 estimates",
        "1 data-loader worker",
    )
