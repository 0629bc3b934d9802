"""tightfit run: the study file, its graph checks, a tiny study end to end, resume after SIGKILL, volumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tightfit.cli import main
from tightfit.study.features import read_features
from tightfit.study.spec import load_study, topological_order
from tightfit.study.ssl import ContrastiveLearning, MaskedImageModeling, nt_xent, patchify

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"image_size": 8, "patch_size": 4, "in_channels": 1, "dim": 16, "depth": 1, "heads": 2}


def fast_trainer() -> dict:
    return {"monitor": {"enabled": False}, "logging": {"progress": False}, "data": {"num_workers": 0}}


def tiny_study(folder: Path, **changes) -> dict:
    study = {
        "name": "tiny",
        "folder": str(folder),
        "device": "cpu",
        "threads": 1,
        "input": "1x8x8",
        "data": {"source": "digits", "limit": 150, "development_fraction": 0.4},
        "cv": {"folds": 3, "repeats": 1, "seed": 0},
        "tracking": {"mlflow": False},
        "stages": [
            {
                "name": "mim",
                "kind": "pretrain",
                "objective": "mim",
                "model": "builtin:vit",
                "model_kwargs": dict(TINY_VIT),
                "epochs": 1,
                "batch_size": 32,
                "trainer": fast_trainer(),
            },
            {
                "name": "simclr",
                "kind": "pretrain",
                "objective": "contrastive",
                "model": "builtin:vit",
                "model_kwargs": dict(TINY_VIT),
                "epochs": 1,
                "batch_size": 32,
                "trainer": fast_trainer(),
            },
            {"name": "mim-features", "kind": "extract", "from": "mim", "batch_size": 16},
            {"name": "simclr-features", "kind": "extract", "from": "simclr", "batch_size": 16},
            {"name": "codes", "kind": "sparse-code", "from": "mim-features", "n_components": 8, "max_iter": 3},
            {
                "name": "classify",
                "kind": "classify",
                "from": ["mim-features", "simclr-features", "codes"],
                "classifiers": [
                    {"name": "svm", "C": [1.0], "gamma": ["scale"], "inner_folds": 2},
                    {"name": "src", "n_nonzero": 5},
                    "logreg",
                ],
            },
            {"name": "statistics", "kind": "evaluate", "from": "classify", "bootstrap": 100},
        ],
    }
    study.update(changes)
    return study


def write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ bad study files
def _broken(tmp_path, mutate) -> tuple[Path, Path]:
    study = tiny_study(tmp_path / "out")
    mutate(study)
    return write(tmp_path / "study.yaml", study), tmp_path / "out"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda s: s["stages"][2].update({"from": "mimm"}),
            "stage 'mim-features': from: unknown stage 'mimm' (did you mean 'mim'?)",
        ),
        (
            lambda s: s["stages"][5].update({"from": ["mim"]}),
            "stage 'classify': from: 'mim' is a pretrain stage; a classify stage takes extract or sparse-code",
        ),
        (
            lambda s: s["stages"][0].update({"from": "simclr"}) or s["stages"][1].update({"from": "mim"}),
            "the stages form a cycle",
        ),
        (
            lambda s: s["data"].update({"source": "volumes", "path": "/no/such/folder"}),
            "data.path: /no/such/folder does not exist",
        ),
        (
            lambda s: s["stages"][3].update({"batchsize": 4}),
            "stage 'simclr-features': batchsize: unknown key (did you mean 'batch_size'?)",
        ),
        (lambda s: s["stages"][0].update({"objective": "jigsaw"}), "stage 'mim': objective:"),
        (
            lambda s: s["stages"][2].update({"from": None, "weights": "/no/such.safetensors", "model": "builtin:vit"}),
            "stage 'mim-features': weights: /no/such.safetensors does not exist",
        ),
        (
            lambda s: s["stages"][0]["trainer"].update({"epocs": 2}),
            "stage 'mim': trainer.epocs: unknown setting (did you mean 'epochs'?)",
        ),
    ],
)
def test_bad_study_is_one_line_exit_2_nothing_written(tmp_path, capsys, mutate, expected):
    path, folder = _broken(tmp_path, mutate)
    assert main(["run", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and "\n" not in error and "Traceback" not in error
    assert not folder.exists()


def test_graph_order_puts_inputs_first(tmp_path):
    study = tiny_study(tmp_path)
    study["stages"] = list(reversed(study["stages"]))
    order = topological_order(load_study(write(tmp_path / "s.yaml", study)))
    assert (
        order.index("mim")
        < order.index("mim-features")
        < order.index("codes")
        < order.index("classify")
        < order.index("statistics")
    )


# ------------------------------------------------------------------------------ objectives
def test_patchify_matches_the_patch_embedding_order():
    images = torch.rand(2, 3, 8, 8)
    convolution = torch.nn.Conv2d(3, 1, kernel_size=4, stride=4, bias=False)
    weight = torch.zeros(1, 3, 4, 4)
    weight[0, 1, 2, 3] = 1.0  # picks channel 1, row 2, column 3 of every patch
    convolution.weight.data = weight
    expected = convolution(images).flatten(2).transpose(1, 2)[..., 0]
    assert torch.allclose(patchify(images, 4)[..., 1 * 16 + 2 * 4 + 3], expected)
    volumes = torch.rand(1, 1, 8, 8, 8)
    assert patchify(volumes, 4).shape == (1, 8, 64)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped():
    generator = torch.Generator().manual_seed(0)
    views = torch.randn(8, 16, generator=generator)
    aligned = nt_xent(torch.cat([views, views]), temperature=0.1)
    shuffled = nt_xent(torch.cat([views, views.roll(1, dims=0)]), temperature=0.1)
    assert aligned < 0.1 < shuffled


def test_objectives_return_a_loss_the_trainer_uses():
    from tightfit.models.spec import build_model
    from tightfit.step.loss import forward_and_loss

    vit = build_model("builtin:vit", num_classes=10, **TINY_VIT)
    for wrapper in (MaskedImageModeling(vit, 0.5, 16), ContrastiveLearning(vit, 8)):
        _, loss = forward_and_loss(wrapper, torch.rand(4, 1, 8, 8))  # a bare-image batch: no target
        assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
        assert all(
            key.startswith(("encoder.", "decoder", "mask_token", "prediction", "projection"))
            for key in wrapper.state_dict()
        )
    volume_vit = build_model("builtin:vit3d", num_classes=2, image_size=8, patch_size=4, dim=16, depth=1, heads=2)
    _, loss = forward_and_loss(MaskedImageModeling(volume_vit, 0.5, 16), torch.rand(2, 1, 8, 8, 8))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------ end to end
def test_tiny_study_end_to_end_then_skipped(tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    folder = tmp_path / "study"
    path = write(tmp_path / "study.yaml", tiny_study(folder, tracking={"mlflow": True}))
    assert main(["run", str(path), "--json"]) == 0
    results = json.loads((folder / "results.json").read_text())
    markdown = (folder / "results.md").read_text()
    table = results["evaluations"]["statistics"]["table"]
    assert {(row["arm"], row["classifier"]) for row in table} == {
        (arm, classifier)
        for arm in ("mim-features", "simclr-features", "codes")
        for classifier in ("svm", "src", "logreg")
    }
    for row in table:
        low, high = row["accuracy_ci"]
        assert low <= row["accuracy"] <= high
        assert f"| {row['arm']} | {row['classifier']} | {row['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in markdown
    comparisons = results["evaluations"]["statistics"]["comparisons"]["svm"]
    assert len(comparisons["pairs"]) == 3 and "friedman" in comparisons
    assert "Paired tests between arms, src" in markdown and "Friedman" in markdown
    assert all(stage["status"] == "complete" and stage["measured_s"] > 0 for stage in results["stages"])
    assert (folder / "stages/statistics/accuracy_ci.png").stat().st_size > 0
    assert "mim-features" in (folder / "report.html").read_text()  # tightfit report's study page
    # every sample of the evaluation part has features, once, with its label
    features = read_features(folder / "stages/mim-features/features")
    assert len(features) == 90 and len(set(features.ids)) == 90 and features.features.shape[1] == 16
    # MLflow: one parent run, a nested run per stage
    client = mlflow.tracking.MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    parent = json.loads((folder / "tracking.json").read_text())["parent_run_id"]
    experiment = client.get_experiment_by_name("tiny")
    nested = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(run.info.run_name for run in nested) == sorted(stage["name"] for stage in results["stages"])
    # a second run changes nothing and runs nothing
    manifests = {p: p.read_text() for p in folder.glob("stages/*/manifest.json")}
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert "up to date" in capsys.readouterr().err
    assert {p: p.read_text() for p in folder.glob("stages/*/manifest.json")} == manifests
    # changing a classifier re-runs classify and statistics only
    study = tiny_study(folder, tracking={"mlflow": True})
    study["stages"][5]["classifiers"] = ["logreg", "knn"]
    write(path, study)
    assert main(["run", str(path)]) == 0
    changed = {p.parent.name for p in folder.glob("stages/*/manifest.json") if manifests[p] != p.read_text()}
    assert changed == {"classify", "statistics"}


SLOW_MODEL = """
import time
import torch

class Slow(torch.nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = torch.nn.Linear(64, 12)
        self.head = torch.nn.Linear(12, num_classes)

    def forward(self, images):
        time.sleep(0.1)
        return self.head(torch.tanh(self.body(images.flatten(1))))

def slow(num_classes=10):
    return Slow(num_classes)
"""


def test_sigkill_during_extraction_then_resume_gives_identical_features(tmp_path, monkeypatch):
    (tmp_path / "slow_extractor.py").write_text(SLOW_MODEL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(tmp_path)]), "OMP_NUM_THREADS": "1"}

    def study(folder: Path) -> Path:
        content = tiny_study(folder, data={"source": "digits", "limit": 96, "development_fraction": 0})
        content["stages"] = [{"name": "features", "kind": "extract", "model": "slow_extractor:slow", "batch_size": 8}]
        return write(tmp_path / f"{folder.name}.yaml", content)

    command = [sys.executable, "-m", "tightfit", "run", "--trust-code"]  # the model is Python code from a file
    killed = tmp_path / "killed"
    assert main(["run", str(study(killed)), "--dry-run"]) == 2  # refused without --trust-code
    process = subprocess.Popen(
        command + [str(study(killed))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shard_folder = killed / "stages/features/features"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shard_folder.glob("shard-*.safetensors"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list(shard_folder.glob("shard-*.safetensors")))
    assert 3 <= written < 12, "the kill must land mid-extraction"
    monkeypatch.syspath_prepend(str(tmp_path))  # the resumed and the clean run go in-process: faster
    assert main(["run", str(study(killed)), "--resume", "--trust-code"]) == 0
    clean = tmp_path / "clean"
    assert main(["run", str(study(clean)), "--trust-code"]) == 0
    resumed, reference = read_features(shard_folder), read_features(clean / "stages/features/features")
    assert resumed.ids == reference.ids and len(resumed) == 96
    assert np.array_equal(resumed.labels, reference.labels)
    assert np.array_equal(resumed.features, reference.features)
    manifest = json.loads((killed / "stages/features/manifest.json").read_text())
    assert any("resumed after" in note for note in manifest["notes"])


def make_volumes(root: Path, per_class: int, side: int = 8) -> None:
    """Two classes of random volumes, the second with a bright cube; every other file NIfTI when nibabel is there."""
    generator = np.random.default_rng(0)
    try:
        import nibabel
    except ImportError:
        nibabel = None
    for label, name in enumerate(("healthy", "lesion")):
        (root / name).mkdir(parents=True)
        for case in range(per_class):
            volume = generator.normal(size=(side, side, side)).astype(np.float32)
            volume[2:6, 2:6, 2:6] += 3.0 * label
            if nibabel is not None and case % 2:
                nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(root / name / f"case-{case}.nii.gz"))
            else:
                np.save(root / name / f"case-{case}.npy", volume)


def test_volumes_study_with_3d_mim_and_slices(tmp_path):
    root = tmp_path / "volumes"
    make_volumes(root, 8)
    study = {
        "name": "volumes",
        "folder": str(tmp_path / "study"),
        "device": "cpu",
        "threads": 1,
        "data": {"source": "volumes", "path": str(root), "development_fraction": 0.5},
        "cv": {"folds": 2, "seed": 0},
        "tracking": {"mlflow": False},
        "stages": [
            {
                "name": "mim3d",
                "kind": "pretrain",
                "objective": "mim",
                "model": "builtin:vit3d",
                "model_kwargs": {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2},
                "epochs": 1,
                "batch_size": 4,
                "trainer": fast_trainer(),
            },
            {"name": "mim3d-features", "kind": "extract", "from": "mim3d"},
            {
                "name": "slice-features",
                "kind": "extract",
                "model": "builtin:vit",
                "model_kwargs": {**TINY_VIT},
                "slices": {"axis": 0, "aggregate": "all"},
            },
            {
                "name": "classify",
                "kind": "classify",
                "from": ["mim3d-features", "slice-features"],
                "classifiers": ["logreg"],
            },
            {"name": "statistics", "kind": "evaluate", "from": "classify", "bootstrap": 100},
        ],
    }
    assert main(["run", str(write(tmp_path / "volumes.yaml", study))]) == 0
    slices = read_features(tmp_path / "study/stages/slice-features/features")
    assert slices.features.shape == (8, 8 * 16)  # 8 slices x 16 features each, kept ("all")
    volumes = read_features(tmp_path / "study/stages/mim3d-features/features")
    assert volumes.features.shape == (8, 16) and all(
        sample.startswith(("healthy/", "lesion/")) for sample in volumes.ids
    )
    assert "slice-features | logreg" in (tmp_path / "study/results.md").read_text()


def test_dry_run_plans_extract_stages_forward_only(tmp_path, capsys):
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path / "out"))
    assert main(["run", str(path), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    kinds = {stage["name"]: stage["kind"] for stage in plan["stages"]}
    assert kinds["mim-features"] == "extract" and kinds["mim"] == "train" and kinds["classify"] == "cpu"
    extract = next(stage for stage in plan["stages"] if stage["name"] == "mim-features")
    assert extract["plan"]["mode"] == "inference" and extract["plan"]["breakdown"]["gradients"] == 0
    assert extract["optimizer"] is None and extract["micro_batch_size"] == 16
    assert not (tmp_path / "out").exists()


def test_seed002_example_is_a_valid_study_planned_forward_only():
    from tightfit.study.plan import study_pipeline

    config = load_study(REPO / "examples/pipelines/seed002-rtx3050.yaml", check_files=False)
    pipeline = study_pipeline(config)
    kinds = {stage.name: stage.kind for stage in pipeline.stages}
    assert kinds["mim-features"] == kinds["slice-features"] == "extract"
    assert kinds["vit-mim"] == "train" and pipeline.device == "rtx3050-laptop-6gb"
    assert next(stage for stage in pipeline.stages if stage.name == "slice-features").input == "1x96x96"
    load_study(REPO / "examples/pipelines/digits-study.yaml")


def test_resume_continues_a_pretrain_stage_from_its_checkpoint(tmp_path, capsys):
    folder = tmp_path / "study"
    study = tiny_study(folder)
    study["stages"] = study["stages"][:1]  # the MIM pre-training only
    path = write(tmp_path / "study.yaml", study)
    assert main(["run", str(path)]) == 0
    run_dir = folder / "stages/mim/run"
    steps_before = json.loads((run_dir / "summary.json").read_text())["steps"]
    manifest = json.loads((folder / "stages/mim/manifest.json").read_text())
    manifest["status"] = "running"  # as a crash after the last checkpoint leaves it
    (folder / "stages/mim/manifest.json").write_text(json.dumps(manifest))
    assert main(["run", str(path), "--resume"]) == 0
    resumed = json.loads((folder / "stages/mim/manifest.json").read_text())
    assert resumed["status"] == "complete" and "resumed from the last checkpoint" in resumed["notes"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps_before  # nothing trained twice


@pytest.mark.slow
def test_seed002_study_runs_end_to_end_on_generated_volumes(tmp_path):
    """The shipped seed-002 file's stage graph, with tiny models and 1 epoch, on volumes made here."""
    make_volumes(tmp_path / "volumes", 12)
    study = yaml.safe_load((REPO / "examples/pipelines/seed002-rtx3050.yaml").read_text())
    tiny3d = {"image_size": 8, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2}
    study.update(
        folder=str(tmp_path / "study"),
        device="cpu",
        threads=1,
        input="1x8x8x8",
        cv={"folds": 2, "repeats": 1, "seed": 0},
        tracking={"mlflow": False},
    )
    study["data"]["path"] = str(tmp_path / "volumes")
    for stage in study["stages"]:
        if stage["kind"] == "pretrain":
            stage.update(epochs=1, model_kwargs=tiny3d, decoder_dim=16, batch_size=4)
            stage["trainer"] = {**stage.get("trainer", {}), **fast_trainer()}
        if stage.get("model") == "builtin:vit3d" and stage["kind"] == "extract":
            stage["model_kwargs"] = tiny3d
        if stage.get("model") == "builtin:vit":
            stage["model_kwargs"] = dict(TINY_VIT)
        if stage["kind"] == "sparse-code":
            stage["n_components"] = 4
        if stage["kind"] == "classify":
            stage.update(
                n_jobs=1, classifiers=[{"name": "svm", "C": [1.0], "gamma": ["scale"], "inner_folds": 2}, "src"]
            )
        if stage["kind"] == "evaluate":
            stage["bootstrap"] = 100
    assert main(["run", str(write(tmp_path / "seed002.yaml", study))]) == 0
    results = json.loads((tmp_path / "study/results.json").read_text())
    rows = {(row["arm"], row["classifier"]) for row in results["evaluations"]["statistics"]["table"]}
    arms = ("mim-features", "contrastive-features", "vit-pure-features", "slice-features", "sparse-codes")
    assert rows == {(arm, classifier) for arm in arms for classifier in ("svm", "src")}
    assert "friedman" in results["evaluations"]["statistics"]["comparisons"]["svm"]


def test_every_arm_reproduces_to_the_last_digit_from_scratch(tmp_path):
    """Two runs from scratch in one process, a supervised stage before the pre-training ones (as in the digits
    study): the same weights, features and fold accuracies, bit for bit, for every arm."""
    outcomes = []
    for run in ("first", "second"):
        study = tiny_study(
            tmp_path / run, data={"source": "digits", "limit": 120, "development_fraction": 0.4}, threads=2
        )
        cnn = {
            "name": "cnn",
            "kind": "train",
            "model": "builtin:digits-cnn",
            "epochs": 1,
            "batch_size": 32,
            "trainer": fast_trainer(),
        }
        study["stages"] = [
            cnn,
            *study["stages"][:2],
            {"name": "cnn-features", "kind": "extract", "from": "cnn"},
            *study["stages"][2:4],
            {
                "name": "classify",
                "kind": "classify",
                "from": ["cnn-features", "mim-features", "simclr-features"],
                "classifiers": ["logreg", {"name": "svm", "C": [1.0], "gamma": ["scale"], "inner_folds": 2}],
            },
        ]
        assert main(["run", str(write(tmp_path / f"{run}.yaml", study))]) == 0
        folder = tmp_path / run / "stages"
        features = {
            arm: read_features(folder / arm / "features").features
            for arm in ("cnn-features", "mim-features", "simclr-features")
        }
        accuracies = json.loads((folder / "classify" / "classification.json").read_text())["results"]
        outcomes.append(
            (
                features,
                {arm: {name: record["fold_accuracy"] for name, record in by.items()} for arm, by in accuracies.items()},
            )
        )
    (first_features, first_accuracy), (second_features, second_accuracy) = outcomes
    for arm in first_features:
        assert np.array_equal(first_features[arm], second_features[arm]), arm
    assert first_accuracy == second_accuracy


def test_the_plan_gives_every_stage_a_time_and_the_study_a_total_on_the_target(tmp_path):
    from tightfit.plan.pipeline import plan_pipeline
    from tightfit.study.plan import CPU_BLAS_FLOPS, study_pipeline

    study = tiny_study(tmp_path / "out", plan_device="rtx3050-laptop-6gb")
    study["stages"][-2]["classifiers"] = ["knn", "svm"]
    config = load_study(write(tmp_path / "study.yaml", study), check_files=False)
    result = plan_pipeline(study_pipeline(config)).to_dict()
    stages = {stage["name"]: stage for stage in result["stages"]}
    assert all(stage["time_s"] is not None for stage in stages.values()), stages
    assert stages["mim"]["time_s"] == pytest.approx(stages["mim"]["epoch_time_s"] * 1)  # epochs: 1
    assert stages["mim-features"]["accumulation_steps"] == 1
    assert result["total_time_s"] == pytest.approx(sum(stage["time_s"] for stage in stages.values()))
    assert result["total_time_h"] == pytest.approx(result["total_time_s"] / 3600, abs=0.01)
    classify = stages["classify"]
    assert classify["budget_bytes"] == 21 * 10**9 and "rtx3050-laptop-6gb's host" in classify["why"]  # the laptop's RAM
    # 150 digits, 40 % development: 90 evaluated, 3 folds of 60 train / 30 test, 3 arms, 16-wide features
    knn = 30 * 60 * 16 * 2 / CPU_BLAS_FLOPS * 3 * 3
    assert classify["time_s"] > knn  # knn plus the svm's nested grid


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "results.md is not from a study run here"),
        (["--resume"], "is not a study folder"),
    ],
)
def test_a_folder_with_the_users_files_is_refused_and_left_byte_identical(tmp_path, capsys, argv, expected):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.md").write_text("# my own results\n")
    (folder / "notes.txt").write_text("keep me")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    path = write(tmp_path / "study.yaml", tiny_study(tmp_path / "elsewhere"))
    assert main(["run", str(path), "--folder", str(folder), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and "\n" not in error and "Traceback" not in error
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
