"""Nothing a user is handed runs code: each payload of issue 9 planted and refused.

Every payload would create a marker file if it ran; each test asserts the marker is absent, the
command exits 2 with one line naming the opt-in, and the files already on disk are unchanged.
"""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tightfit.cli import main
from tightfit.config import load_config
from tightfit.errors import ConfigError, SpecError
from tightfit.names import MODEL_PREFIXES


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def shell_payload(marker: Path) -> dict:
    """A config's model section that, if it were honoured, would run a shell command."""
    return {"model": "os:system", "model_options": {"command": f"touch {marker}"}}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_refusal(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


# --- module:callable specs from files --------------------------------------------------------


def test_a_recipe_naming_os_system_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(shell_payload(marker) | {"epochs": 1}))
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert_one_line_refusal(code, err, "os:system", "--trust-code", str(recipe))
    # even with --trust-code, os holds no model: refused before it is imported
    code, err = run_cli(capsys, "train", str(recipe), "--trust-code", "--run-dir", str(tmp_path / "run"))
    assert_one_line_refusal(code, err, "'os'", "holds no model")
    assert not marker.exists()
    assert snapshot(tmp_path) == before


@pytest.fixture
def planted_run(tmp_path) -> tuple[Path, Path]:
    """A run folder someone sent: its config.yaml names os:system."""
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "last").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(shell_payload(marker) | {"epochs": 1}))
    (run_dir / "summary.json").write_text("{}")
    return run_dir, marker


def test_train_resume_of_a_planted_run_folder_runs_nothing(planted_run, capsys):
    run_dir, marker = planted_run
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_refusal(code, err, "os:system", "--trust-code", "config.yaml")
    assert not marker.exists() and snapshot(run_dir) == before


def test_compress_of_a_planted_run_folder_runs_nothing(planted_run, capsys):
    run_dir, marker = planted_run
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "compress", str(run_dir), "--output", str(run_dir.parent / "out"))
    assert_one_line_refusal(code, err, "os:system", "--trust-code")
    assert not marker.exists() and snapshot(run_dir) == before
    assert not (run_dir.parent / "out").exists()


def test_a_pipeline_file_and_a_compression_recipe_need_trust_for_code(tmp_path, capsys):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"name": "s", "model": "mylab.models:Net", "input": "4"}]}))
    code, err = run_cli(capsys, "plan", str(pipeline))
    assert_one_line_refusal(code, err, "stages[0].model", "mylab.models:Net", "--trust-code")
    recipe = tmp_path / "compress.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"step": "distill", "teacher": "mylab.models:Big"}]}))
    code, err = run_cli(
        capsys, "compress", "builtin:digits-cnn", "--data", "digits", "--recipe", str(recipe), "-o", str(tmp_path / "o")
    )
    assert_one_line_refusal(code, err, "steps[0].teacher", "--trust-code")
    assert not (tmp_path / "o").exists()


def test_plan_model_os_abort_is_one_line_not_a_crash(tmp_path):
    # in a subprocess: if os.abort were called it would take pytest down with it
    result = subprocess.run(
        [sys.executable, "-m", "tightfit", "plan", "--model", "os:abort", "--input", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "holds no model" in result.stderr


@pytest.fixture
def user_models(tmp_path, monkeypatch) -> Path:
    """A user's own model module on sys.path; its non-model class leaves a marker if built."""
    (tmp_path / "mylab_models.py").write_text(
        "from pathlib import Path\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.layer = nn.Linear(width, 2)\n"
        "    def forward(self, x):\n"
        "        return self.layer(x)\n"
        "def make_net(width=4):\n"
        "    return Net(width)\n"
        "def not_a_model():\n"
        "    return 42\n"
        "class Launcher:\n"
        "    def __init__(self):\n"
        f"        Path({str(tmp_path / 'LAUNCHED')!r}).touch()\n"
        "from os import system\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_users_module_from_a_file_runs_with_trust_code_or_the_allow_list(user_models, tmp_path, monkeypatch):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mylab_models:Net", "model_options": {"width": 8}}))
    with pytest.raises(ConfigError, match="--trust-code"):
        load_config(recipe)
    assert load_config(recipe, trust_code=True).model == "mylab_models:Net"
    monkeypatch.setenv("TIGHTFIT_TRUSTED_MODULES", "other, mylab_models")
    assert load_config(recipe).model_options == {"width": 8}
    monkeypatch.setenv("TIGHTFIT_TRUSTED_MODULES", "mylab")  # a prefix of the name, not of the module path
    with pytest.raises(ConfigError):
        load_config(recipe)
    # a spec given on the command line is the user's own choice
    monkeypatch.delenv("TIGHTFIT_TRUSTED_MODULES")
    assert load_config(recipe, ["model=mylab_models:make_net"]).model == "mylab_models:make_net"


def test_only_module_classes_and_python_factories_are_called(user_models):
    from torch import nn

    from tightfit.models.spec import build_model

    assert isinstance(build_model("mylab_models:Net", width=3), nn.Module)
    assert isinstance(build_model("mylab_models:make_net"), nn.Module)
    with pytest.raises(SpecError, match="not a subclass of torch.nn.Module"):
        build_model("mylab_models:Launcher")
    assert not (user_models / "LAUNCHED").exists()  # refused before the constructor ran
    with pytest.raises(SpecError, match="returned int"):
        build_model("mylab_models:not_a_model")
    # re-exported from os into the user's module: its origin is checked, not the module it sits in
    with pytest.raises(SpecError, match="not a model class or factory"):
        build_model("mylab_models:system", command=f"touch {user_models / 'PWNED'}")
    with pytest.raises(SpecError, match="not a model class or factory"):
        build_model("torch.serialization:load", f="x.pt")
    for spec in ("subprocess:run", "builtins:exec", "shutil:rmtree", "sys:exit"):
        with pytest.raises(SpecError, match="holds no model"):
            build_model(spec)
    assert not (user_models / "PWNED").exists()


def test_the_spec_builders_and_the_torch_free_prefix_list_agree():
    from tightfit.models.spec import PREFIXES

    assert tuple(PREFIXES) == MODEL_PREFIXES


# --- .pt2 archives ------------------------------------------------------------------------


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(source: Path, target: Path, marker: Path) -> None:
    """Copy a .pt2 archive with its inner ``model.pt`` pickle replaced by a shell payload."""
    import torch

    payload = io.BytesIO()
    torch.save(_ShellPayload(marker), payload)
    with zipfile.ZipFile(source) as archive_in, zipfile.ZipFile(target, "w") as archive_out:
        for item in archive_in.infolist():
            data = archive_in.read(item.filename)
            archive_out.writestr(item, payload.getvalue() if item.filename.endswith("/model.pt") else data)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    import torch

    from tightfit.compression.export import export_program

    directory = tmp_path_factory.mktemp("exported")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    metadata = {"class_names": ["a", "b", "c"], "input_shape": [4]}
    return export_program(model, (torch.rand(2, 4), None), directory / "model.pt2", metadata=metadata)


def test_a_pt2_written_by_this_machine_loads(exported, tmp_path, capsys):
    import numpy as np

    inputs = tmp_path / "x.npy"
    np.save(inputs, np.ones((2, 4), dtype=np.float32))
    code = main(["predict", str(exported), str(inputs), "--json"])
    assert code == 0, capsys.readouterr().err


def test_a_planted_pt2_is_refused_by_file_and_by_folder(exported, tmp_path, capsys):
    import numpy as np

    marker = tmp_path / "PWNED"
    folder = tmp_path / "received"
    folder.mkdir()
    planted = folder / "model.pt2"
    _plant(exported, planted, marker)
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.ones((1, 4), dtype=np.float32))
    before = snapshot(folder)
    for target in (planted, folder):  # predict DIR picks model.pt2 by itself when there is no .onnx
        code, err = run_cli(capsys, "predict", str(target), str(inputs))
        assert_one_line_refusal(code, err, "--trust-pt2", "not written by tightfit compress")
    assert not marker.exists() and snapshot(folder) == before


def test_a_recorded_pt2_edited_afterwards_is_refused(exported, tmp_path, capsys):
    import numpy as np

    edited = tmp_path / "model.pt2"
    edited.write_bytes(exported.read_bytes() + b"\0")  # trust follows the content, not the name
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.ones((1, 4), dtype=np.float32))
    code, err = run_cli(capsys, "predict", str(edited), str(inputs))
    assert_one_line_refusal(code, err, "--trust-pt2")


def test_the_payload_really_runs_without_the_guard(exported, tmp_path):
    """The planted archive is a real exploit: torch.export.load runs it (what --trust-pt2 accepts)."""
    import torch

    marker = tmp_path / "PWNED"
    planted = tmp_path / "evil.pt2"
    _plant(exported, planted, marker)
    with pytest.raises((AssertionError, RuntimeError, TypeError)):  # os.system returned an int, not a program part
        torch.export.load(str(planted))
    assert marker.exists()


def test_shipped_recipes_need_no_opt_in_but_the_rest_of_tightfit_does(tmp_path):
    from tightfit.config import default_recipe

    recipes = default_recipe().parent
    assert load_config(recipes / "lora-text-classification.yaml").model == "tightfit.models.text:minilm_classifier"
    recipe = tmp_path / "sneaky.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": "tightfit.models.spec:build_model", "model_options": {"spec": "evil:run"}})
    )
    with pytest.raises(ConfigError, match="--trust-code"):
        load_config(recipe)


def test_an_unwritable_trust_record_warns_but_does_not_fail_the_export(tmp_path, monkeypatch):
    from tightfit.trust import is_recorded_program, record_program

    archive = tmp_path / "model.pt2"
    archive.write_bytes(b"archive")
    (tmp_path / "home").write_text("a file where the record's folder should be")
    monkeypatch.setenv("TIGHTFIT_HOME", str(tmp_path / "home" / "tightfit"))
    with pytest.warns(UserWarning, match="--trust-pt2"):
        record_program(archive)
    assert not is_recorded_program(archive)


# --- sharded (DCP) checkpoints ------------------------------------------------------------

DIGITS = str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A one-process ``distributed.strategy=fsdp`` run: its checkpoints are DCP shards."""
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    code = main(
        [
            "train",
            DIGITS,
            "distributed.strategy=fsdp",
            "checkpointing=auto",
            "max_steps=1",
            "data.limit=32",
            "logging.progress=false",
            "logging.tensorboard=false",
            "monitor.enabled=false",
            "--run-dir",
            str(run_dir),
        ]
    )
    assert code == 0
    return run_dir


def _plant_metadata(run_dir: Path, marker: Path) -> None:
    import pickle

    for name in ("best", "last"):
        (run_dir / "checkpoints" / name / "shards" / ".metadata").write_bytes(pickle.dumps(_ShellPayload(marker)))


def test_a_sharded_checkpoint_exports_and_resumes_through_the_safe_reader(sharded_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from tightfit.runs.distributed_checkpoint import read_sharded_weights

    assert (
        main(
            ["export-checkpoint", str(sharded_run), "--checkpoint", "last", "--output", str(tmp_path / "m.safetensors")]
        )
        == 0
    )
    exported = load_file(str(tmp_path / "m.safetensors"))
    assert exported.keys() == read_sharded_weights(sharded_run / "checkpoints" / "last").keys() and len(exported) > 4
    optimizer = read_sharded_weights(sharded_run / "checkpoints" / "last", part="optimizer")
    assert any(name.endswith(".exp_avg") for name in optimizer)  # the tensors and the non-tensor items load
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded_run, resumed)
    assert main(["train", "--resume", str(resumed), "max_steps=2"]) == 0
    assert json.loads((resumed / "checkpoints" / "last" / "meta.json").read_text())["step"] == 2


@pytest.mark.parametrize("command", ["export-checkpoint", "train --resume"])
def test_a_planted_dcp_metadata_pickle_runs_nothing(sharded_run, tmp_path, capsys, command):
    import shutil

    marker = tmp_path / "PWNED"
    planted = tmp_path / "received"
    shutil.copytree(sharded_run, planted)
    _plant_metadata(planted, marker)
    before = snapshot(planted)
    code, err = run_cli(capsys, *command.split(), str(planted))
    assert_one_line_refusal(code, err, ".metadata", "not checkpoint metadata a safe load accepts")
    assert not marker.exists()
    if command == "export-checkpoint":
        assert snapshot(planted) == before


def test_a_planted_dcp_item_pickle_runs_nothing(tmp_path):
    """DCP's default planner loads non-tensor items with ``weights_only=False``; ours does not."""
    import torch
    import torch.distributed.checkpoint as dcp

    from tightfit.runs.distributed_checkpoint import read_sharded_weights

    marker = tmp_path / "PWNED"
    folder = tmp_path / "checkpoints" / "last"
    dcp.save(
        {"model": {"w": torch.ones(2)}, "optimizer": {"lr": _ShellPayload(marker)}}, checkpoint_id=folder / "shards"
    )
    torch.save({"counters": {}}, folder / "state.pt")
    (folder / "meta.json").write_text('{"step": 1}')
    assert torch.equal(read_sharded_weights(folder)["w"], torch.ones(2))
    with pytest.raises(ConfigError, match="optimizer.lr holds Python objects a safe load refuses"):
        read_sharded_weights(folder, part="optimizer")
    assert not marker.exists()
    dcp.load({"optimizer": {"lr": 0.0}}, checkpoint_id=folder / "shards")  # torch's own planner runs the payload
    assert marker.exists()
