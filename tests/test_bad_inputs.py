"""Every bad input is one line (issue 9, item 10): for each command, a matrix of mistakes a user
makes — configs, overrides, model and input specs, budgets, devices, data sets, checkpoints,
artifacts, run folders, pipeline and recipe files — each answered with exit code 2, exactly one
line on stderr, no traceback, and every file already on disk unchanged.

Cases run in-process through ``tightfit.cli.main`` (fast: torch is imported once); the
``os:abort`` case, which would take pytest down if it ran, runs in tests/test_trust.py in a
subprocess.
"""

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from tightfit.cli import main

TINY_LLAMA = Path(__file__).resolve().parents[1] / "src" / "tightfit" / "configs" / "tiny-llama"
W = "{w}"  # replaced by the workspace folder in every argument


@dataclass
class Case:
    argv: list[str]
    fragment: str  # a piece of the one line the user must see
    code: int = 2


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


BINARY = bytes(range(256)) * 4
PNG_HEADER = b"\x89PNG\r\n\x1a\n" + b"\0" * 40


def study(data: str, *, folds: int, weights: str | None = None) -> str:
    """A one-extract, one-classify study on ``data`` (relative paths resolve in the workspace)."""
    weights = f", weights: {weights}" if weights else ""
    return (
        f"name: bad\nfolder: study-out\ndevice: cpu\ninput: 1x8x8\n{data}\ncv: {{folds: {folds}, repeats: 1}}\n"
        "tracking: {mlflow: false}\nstages:\n"
        "  - {name: feats, kind: extract, model: builtin:vit, batch_size: 16, model_kwargs: {image_size: 8, "
        f"patch_size: 4, in_channels: 1, dim: 16, depth: 1, heads: 2}}{weights}}}\n"
        "  - {name: classify, kind: classify, from: [feats], classifiers: [logreg]}\n"
    )


def populate(workspace: Path) -> None:
    """The files the cases point at; all of them must be unchanged afterwards."""
    write(workspace / "good.yaml", "epochs: 1\n")
    write(workspace / "binary.yaml", BINARY)
    write(workspace / "latin1.yaml", "epochs: 1\n# caf\xe9\n".encode("latin-1"))
    write(workspace / "empty.yaml", "")
    write(workspace / "list.yaml", "- epochs\n- 1\n")
    write(workspace / "broken.yaml", "epochs: [1\n")
    write(workspace / "unknown-key.yaml", "epochz: 1\n")
    write(workspace / "bad-section.yaml", "optimizer: 3\n")
    write(workspace / "code-model.yaml", "model: os:system\nmodel_options: {command: 'touch PWNED'}\n")
    write(workspace / "python-tag.yaml", '!!python/object/apply:os.system ["touch PWNED"]\n')
    write(workspace / "folder-config" / "keep.txt", "mine")
    # Hugging Face folders that are not models
    write(workspace / "hf-list" / "config.json", "[1, 2, 3]")
    write(workspace / "hf-binary" / "config.json", BINARY)
    write(workspace / "hf-unknown" / "config.json", json.dumps({"model_type": "no-such-model"}))
    write(workspace / "hf-empty" / "README.md", "no config here")
    # run folders
    write(workspace / "no-config-run" / "notes.txt", "not a run")
    write(workspace / "user-folder" / "config.yaml", "my: own notes\n")
    write(workspace / "user-folder" / "summary.json", '{"mine": true}')
    write(workspace / "code-run" / "config.yaml", "model: os:system\nmodel_options: {command: 'touch PWNED'}\n")
    write(workspace / "no-checkpoint-run" / "config.yaml", "epochs: 1\n")
    write(workspace / "a-file", "plain file")
    # pipeline and compression recipe files
    write(
        workspace / "pipeline-unknown.yaml",
        "stages:\n  - name: a\n    model: builtin:mlp\n    input: 1x8x8\n    batchsize: 4\n",
    )
    write(workspace / "pipeline-code.yaml", "stages:\n  - name: a\n    model: os:system\n    input: '4'\n")
    write(workspace / "pipeline-no-stages.yaml", "stages: []\n")
    write(workspace / "recipe-unknown-step.yaml", "steps:\n  - step: quantise\n")
    write(workspace / "recipe-bad-value.yaml", "tolerance: -1\n")
    write(workspace / "recipe-code-teacher.yaml", "steps:\n  - step: distill\n    teacher: os:system\n")
    # weights, artifacts and inputs
    write(workspace / "weights.safetensors", BINARY)
    write(workspace / "truncated.safetensors", b'\x10\0\0\0\0\0\0\0{"a": {"dtype":')
    write(workspace / "model.onnx", BINARY)
    write(workspace / "model.pt2", BINARY)
    write(workspace / "model.txt", "not a model")
    write(workspace / "report-folder" / "report.json", "{not json")
    write(workspace / "empty-folder" / ".keep", "")
    write(workspace / "compressed" / "report.json", "{}")
    write(workspace / "input.txt", "hello")
    write(workspace / "input.npy", BINARY)
    write(workspace / "truncated.png", PNG_HEADER)
    # report sources
    write(workspace / "damaged-run" / "summary.json", "{not json")
    write(workspace / "damaged-run" / "config.yaml", "epochs: 1\n")
    write(workspace / "list.json", "[1, 2]")
    write(workspace / "binary.json", BINARY)
    # data
    write(workspace / "data.csv", "a,b,label\n1,2,x\n")
    write(workspace / "corpus-binary.txt", BINARY)
    write(workspace / "corpus-latin1.jsonl", '{"response": "caf\xe9"}\n'.encode("latin-1"))
    # studies (issue 19, item 6): refused before any stage runs
    for name in ("a", "b"):
        write(workspace / "volumes" / name / "1.nii.gz", "not a NIfTI file")
    write(workspace / "pickle.pt", pickle.dumps({"not": "tensors", "call": os.getcwd}))
    write(
        workspace / "study-folds.yaml", study("data: {source: digits, limit: 30, development_fraction: 0.4}", folds=5)
    )
    write(workspace / "study-volumes.yaml", study("data: {source: volumes, path: volumes}", folds=2))
    write(workspace / "study-pickle.yaml", study("data: {source: digits, limit: 60}", folds=2, weights="pickle.pt"))
    # adapters and hf configs
    write(workspace / "bin-adapters" / "adapters" / "adapter_config.json", '{"r": 4}')
    write(workspace / "bin-adapters" / "adapters" / "adapter_model.bin", BINARY)
    write(workspace / "cut-adapters" / "adapters" / "adapter_config.json", '{"r": 4}')
    write(workspace / "cut-adapters" / "adapters" / "adapter_model.safetensors", b'\x10\0\0\0\0\0\0\0{"a": {"dtype":')
    write(workspace / "hf-function" / "config.json", json.dumps({"model_type": "bert", "architectures": ["set_seed"]}))
    # report sources and outputs
    write(workspace / "partial-run" / "summary.json", '{"steps": 3, "epochs": 1}')
    write(workspace / "partial-run" / "config.yaml", "epochs: 1\n")
    write(workspace / "plot.png" / ".keep", "")
    write(workspace / "images" / "cat" / "1.png", PNG_HEADER)
    populate_medical(workspace)


def medical_study(name: str, modalities: str = '["*_t1.nii.gz"]') -> str:
    return (
        f"tracking: {{mlflow: false}}\ndata: {{source: medical, path: {name}, labels: {name}/labels.csv, "
        f"modalities: {modalities}, development_fraction: 0}}\n"
        "stages:\n  - {name: f, kind: extract, model: builtin:vit3d}\n"
    )


def populate_medical(workspace: Path) -> None:
    """Subject folders with one thing wrong each (study files named after them)."""
    import numpy as np

    from medical_files import write_dicom_series, write_nifti

    volume = np.ones((4, 4, 4), dtype=np.float32)
    for folder, subjects in {
        "med-mixed": ("a", "b"),
        "med-missing": ("a", "b", "c"),
        "med-4d": ("a",),
        "med-not-nifti": ("a",),
    }.items():
        write(workspace / folder / "labels.csv", "subject,label\n" + "".join(f"{name},x\n" for name in subjects[:2]))
        for subject in subjects:
            write_nifti(workspace / folder / subject / f"{subject}_t1.nii.gz", volume)
    write_nifti(workspace / "med-mixed" / "a" / "a_t2.nii.gz", volume)  # b has no t2
    write_nifti(workspace / "med-4d" / "a" / "a_t1.nii.gz", np.ones((4, 4, 4, 3), dtype=np.float32))
    write(workspace / "med-not-nifti" / "a" / "a_t1.nii.gz", b"\x1f\x8b" + BINARY)
    write(workspace / "med-dicom" / "labels.csv", "subject,label\na,x\n")
    slices = np.ones((2, 4, 4), dtype=np.uint16)
    write_dicom_series(workspace / "med-dicom" / "a" / "mr", slices, prefix="first-")
    write_dicom_series(workspace / "med-dicom" / "a" / "mr", slices, prefix="second-")
    write(workspace / "med-mixed.yaml", medical_study("med-mixed", '["*_t1.nii.gz", "*_t2.nii.gz"]'))
    write(workspace / "med-missing.yaml", medical_study("med-missing"))
    write(workspace / "med-4d.yaml", medical_study("med-4d"))
    write(workspace / "med-not-nifti.yaml", medical_study("med-not-nifti"))
    write(workspace / "med-dicom.yaml", medical_study("med-dicom", "[mr]"))
    write(
        workspace / "missing-weights.yaml",
        "tracking: {mlflow: false}\nstages:\n  - {name: f, kind: extract, "
        "model: 'torchvision:resnet50', weights: weights/resnet50.pth}\n",
    )


CASES: dict[str, Case] = {
    # --- train: config files --------------------------------------------------------------
    "train missing config": Case(["train", "{w}/nowhere.yaml"], "nowhere.yaml does not exist"),
    "train folder as config": Case(["train", "{w}/folder-config"], "is a folder, not a YAML file"),
    "train binary config": Case(["train", "{w}/binary.yaml"], "not a text file"),
    "train latin-1 config": Case(["train", "{w}/latin1.yaml"], "not UTF-8"),
    "train empty config": Case(["train", "{w}/empty.yaml"], "empty.yaml is empty"),
    "train list config": Case(["train", "{w}/list.yaml"], "expected a mapping of settings"),
    "train invalid yaml": Case(["train", "{w}/broken.yaml"], "not valid YAML at line"),
    "train unknown key in file": Case(["train", "{w}/unknown-key.yaml"], "epochz"),
    "train section given a value": Case(["train", "{w}/bad-section.yaml"], "optimizer"),
    "train python tag": Case(["train", "{w}/python-tag.yaml"], "not valid YAML"),
    "train code model in file": Case(["train", "{w}/code-model.yaml"], "--trust-code"),
    # --- train: overrides -----------------------------------------------------------------
    "train unknown override": Case(["train", "optimizer.lrr=0.1"], "did you mean 'lr'"),
    "train positional after recipe": Case(["train", "{w}/good.yaml", "extra"], "expected key=value"),
    "train infinite lr": Case(["train", "optimizer.lr=.inf"], "finite number"),
    "train nan lr": Case(["train", "optimizer.lr=.nan"], "finite number"),
    "train negative lr": Case(["train", "optimizer.lr=-1"], "optimizer.lr"),
    "train zero epochs": Case(["train", "epochs=0"], "epochs"),
    "train unknown precision": Case(["train", "precision=fp8"], "precision"),
    "train unknown gradient sync": Case(["train", "distributed.gradient_sync=during"], "distributed.gradient_sync"),
    "train unknown optimizer": Case(["train", "optimizer.name=adamm"], "optimizer.name"),
    "train unknown schedule": Case(["train", "schedule.name=cosin"], "schedule.name"),
    "train zero micro batch": Case(["train", "batch.micro_batch_size=0"], "micro_batch_size"),
    "train unknown device": Case(["train", "device=tpu"], "unknown device 'tpu'"),
    "train bad budget": Case(["train", "budget=lots"], "budget"),
    "train value as section": Case(["train", "epochs.x=1"], "epochs is a value, not a section"),
    "train override without key": Case(["train", "=3"], "expected key=value"),
    "train model without prefix": Case(["train", "model=resnet50", "--limit", "20"], "has no prefix"),
    "train unknown builtin": Case(["train", "model=builtin:nope", "--limit", "20"], "unknown builtin model"),
    "train os model on the command line": Case(["train", "model=os:system", "--limit", "20"], "holds no model"),
    "train unknown data source": Case(["train", "data.source=nope"], "data.source (on the command line)"),
    "train missing csv": Case(["train", "data.source=csv", "data.path={w}/nowhere.csv"], "nowhere.csv"),
    "train unknown flag": Case(["train", "--epochs", "3"], "unrecognized arguments"),
    "train limit not a number": Case(["train", "--limit", "many"], "invalid int value"),
    # --- train: model against data, checked before the first step (training/contract.py) -----
    "train unet on class labels": Case(["train", "model=builtin:unet-small", "--limit", "20"], "not (batch, classes)"),
    "train num_classes against data": Case(
        ["train", "model_options.num_classes=5", "--limit", "20"], "but the data has 10 classes"
    ),
    "train mlp input width": Case(
        ["train", "model=builtin:mlp", "model_options.in_features=13", "--limit", "20"],
        "leave out model_options.in_features",
    ),
    "train every_n_epochs zero": Case(["train", "checkpoint.every_n_epochs=0"], "checkpoint.every_n_epochs"),
    "train lr auto empty sweep": Case(["train", "optimizer.lr=auto", "lr_find.max_lr=0"], "lr_find.max_lr"),
    "train binary text corpus": Case(
        ["train", "data.source=text-corpus", "data.path={w}/corpus-binary.txt", f"data.tokenizer={TINY_LLAMA}"],
        "corpus-binary.txt: not UTF-8",
    ),
    "train latin-1 text corpus": Case(
        ["train", "data.source=text-corpus", "data.path={w}/corpus-latin1.jsonl", f"data.tokenizer={TINY_LLAMA}"],
        "corpus-latin1.jsonl: not UTF-8",
    ),
    # --- lr-find ----------------------------------------------------------------------------
    "lr-find plot is a folder": Case(["lr-find", "--plot", "{w}/plot.png"], "plot.png: is a folder"),
    "lr-find code model in file": Case(["lr-find", "{w}/code-model.yaml"], "--trust-code"),
    "lr-find missing config": Case(["lr-find", "{w}/nowhere.yaml"], "nowhere.yaml does not exist"),
    "lr-find min above max": Case(["lr-find", "lr_find.min_lr=2"], "min_lr 2.0 must be below max_lr 1.0"),
    "lr-find too few steps": Case(["lr-find", "lr_find.num_steps=3"], "lr_find.num_steps"),
    "lr-find plot not png": Case(["lr-find", "--plot", "{w}/lr.txt"], "expected a .png file name"),
    "lr-find plot in missing folder": Case(["lr-find", "--plot", "{w}/nowhere/lr.png"], "does not exist"),
    "lr-find unet on class labels": Case(
        ["lr-find", "model=builtin:unet-small", "data.limit=20"], "not (batch, classes)"
    ),
    # --- train: run folders ---------------------------------------------------------------
    "train resume missing folder": Case(["train", "--resume", "{w}/nowhere"], "not a tightfit run directory"),
    "train resume without config": Case(["train", "--resume", "{w}/no-config-run"], "no config.yaml"),
    "train resume with a recipe": Case(
        ["train", "{w}/good.yaml", "--resume", "{w}/no-checkpoint-run"], "overrides only"
    ),
    "train resume without checkpoint": Case(["train", "--resume", "{w}/no-checkpoint-run"], "no complete checkpoint"),
    "train resume code run": Case(["train", "--resume", "{w}/code-run"], "--trust-code"),
    "train run dir is a file": Case(["train", "--run-dir", "{w}/a-file"], "is a file, not a folder"),
    "train run dir is a users folder": Case(["train", "--run-dir", "{w}/user-folder"], "is not a tightfit run"),
    # --- plan -----------------------------------------------------------------------------
    "plan nothing to plan": Case(["plan"], "--model"),
    "plan adam8bit on an M1": Case(
        ["plan", "--model", "builtin:mlp", "--input", "64", "--optimizer", "adam8bit", "--device", "m1-16gb"],
        "adam8bit (bitsandbytes' 8-bit AdamW) does not run on mps",
    ),
    "train unknown nf4 backend": Case(["train", "lora.quantize_base=nf4", "lora.quant_backend=bnb"], "quant_backend"),
    "train int8 through bitsandbytes": Case(
        ["train", "model=builtin:mlp", "lora.quantize_base=int8", "lora.quant_backend=bitsandbytes", "--limit", "20"],
        "int8 bases are quantized by torchao",
    ),
    "plan unknown builtin": Case(["plan", "--model", "builtin:nope", "--input", "4"], "unknown builtin model"),
    "plan bad input spec": Case(["plan", "--model", "builtin:mlp", "--input", "3xx224"], "3xx224"),
    "plan unknown device": Case(["plan", "--model", "builtin:mlp", "--input", "64", "--device", "rtx9999"], "rtx9999"),
    "plan bad memory": Case(["plan", "--model", "builtin:mlp", "--input", "64", "--memory", "lots"], "lots"),
    "plan unknown precision": Case(
        ["plan", "--model", "builtin:mlp", "--input", "64", "--precision", "fp8"], "invalid choice"
    ),
    "plan zero batch": Case(
        ["plan", "--model", "builtin:mlp", "--input", "64", "--batch-size", "0", "--device", "cpu"], "batch"
    ),
    "plan margin above one": Case(["plan", "--model", "builtin:mlp", "--input", "64", "--margin", "2"], "margin"),
    "plan stdlib model": Case(["plan", "--model", "subprocess:run", "--input", "4"], "holds no model"),
    "plan torch loader as model": Case(
        ["plan", "--model", "torch.serialization:load", "--input", "4"], "not a model class or factory"
    ),
    "plan hf config is a list": Case(["plan", "--model", "hf:{w}/hf-list", "--input", "tokens:8"], "holds a JSON list"),
    "plan hf config is binary": Case(["plan", "--model", "hf:{w}/hf-binary", "--input", "tokens:8"], "not valid JSON"),
    "plan hf unknown model type": Case(
        ["plan", "--model", "hf:{w}/hf-unknown", "--input", "tokens:8"], "no-such-model"
    ),
    "plan hf architecture not a model": Case(
        ["plan", "--model", "hf:{w}/hf-function", "--input", "tokens:8"], "'set_seed' in"
    ),
    "plan ddp without devices": Case(
        ["plan", "--model", "builtin:mlp", "--input", "64", "--strategy", "ddp"], "give them with --devices"
    ),
    "plan hf without config": Case(["plan", "--model", "hf:{w}/hf-empty", "--input", "tokens:8"], "no config.json"),
    "plan missing pipeline": Case(["plan", "{w}/nowhere.yaml"], "nowhere.yaml does not exist"),
    "plan binary pipeline": Case(["plan", "{w}/binary.yaml"], "not a text file"),
    "plan pipeline unknown key": Case(
        ["plan", "{w}/pipeline-unknown.yaml"], "stages[0].batchsize: unknown key; did you mean 'batch_size'?"
    ),
    "plan pipeline without stages": Case(["plan", "{w}/pipeline-no-stages.yaml"], "stages"),
    "plan pipeline code model": Case(["plan", "{w}/pipeline-code.yaml"], "--trust-code"),
    "plan pipeline python tag": Case(["plan", "{w}/python-tag.yaml"], "not valid YAML"),
    # --- batch-size -----------------------------------------------------------------------
    "batch-size without model": Case(["batch-size", "--input", "4"], "--model"),
    "batch-size bad memory": Case(
        ["batch-size", "--model", "builtin:mlp", "--input", "64", "--memory", "2 bananas"], "2 bananas"
    ),
    "batch-size unknown builtin": Case(
        ["batch-size", "--model", "builtin:nope", "--input", "64", "--memory", "1GiB"], "unknown builtin"
    ),
    "batch-size bad input": Case(["batch-size", "--model", "builtin:mlp", "--input", "axb", "--memory", "1GiB"], "axb"),
    "batch-size zero accumulation": Case(
        ["batch-size", "--model", "builtin:mlp", "--input", "64", "--memory", "1GiB", "--accumulation", "0"],
        "accumulation",
    ),
    "batch-size unknown device": Case(
        ["batch-size", "--model", "builtin:mlp", "--input", "64", "--device", "tpu"], "tpu"
    ),
    "batch-size unknown optimizer": Case(
        ["batch-size", "--model", "builtin:mlp", "--input", "64", "--optimizer", "adamm"], "invalid choice"
    ),
    # --- compress -------------------------------------------------------------------------
    "compress neither folder nor spec": Case(["compress", "{w}/nowhere"], "neither a run directory nor a model spec"),
    "compress folder without config": Case(["compress", "{w}/no-config-run"], "no config.yaml"),
    "compress code run": Case(["compress", "{w}/code-run", "-o", "{w}/out"], "--trust-code"),
    "compress missing recipe": Case(
        ["compress", "builtin:digits-cnn", "--data", "digits", "-o", "{w}/out", "--recipe", "{w}/nowhere.yaml"],
        "does not exist",
    ),
    "compress empty recipe": Case(
        ["compress", "builtin:digits-cnn", "--data", "digits", "-o", "{w}/out", "--recipe", "{w}/empty.yaml"],
        "is empty",
    ),
    "compress unknown recipe step": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--recipe",
            "{w}/recipe-unknown-step.yaml",
        ],
        "did you mean 'quantize'",
    ),
    "compress bad recipe value": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--recipe",
            "{w}/recipe-bad-value.yaml",
        ],
        "tolerance",
    ),
    "compress code teacher": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--recipe",
            "{w}/recipe-code-teacher.yaml",
        ],
        "--trust-code",
    ),
    "compress unknown step name": Case(
        ["compress", "builtin:digits-cnn", "--data", "digits", "-o", "{w}/out", "--steps", "prune,quantise"],
        "did you mean 'quantize'",
    ),
    "compress recipe and steps": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--recipe",
            "{w}/good.yaml",
            "--steps",
            "prune",
        ],
        "not both",
    ),
    "compress spec without data": Case(["compress", "builtin:digits-cnn", "-o", "{w}/out"], "give the data too"),
    "compress spec without output": Case(["compress", "builtin:digits-cnn", "--data", "digits"], "give --output"),
    "compress missing checkpoint": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--checkpoint",
            "{w}/nowhere.safetensors",
        ],
        "does not exist",
    ),
    "compress garbage checkpoint": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--checkpoint",
            "{w}/weights.safetensors",
        ],
        "not a safetensors file",
    ),
    "compress truncated checkpoint": Case(
        [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "-o",
            "{w}/out",
            "--checkpoint",
            "{w}/truncated.safetensors",
        ],
        "not a safetensors file",
    ),
    "compress output holds a report": Case(
        ["compress", "builtin:digits-cnn", "--data", "digits", "-o", "{w}/compressed"], "already holds a report"
    ),
    "compress unknown data source": Case(
        ["compress", "builtin:digits-cnn", "--data", "nosuch", "-o", "{w}/out"], "nosuch"
    ),
    # --- predict --------------------------------------------------------------------------
    # --- run (study files), export-checkpoint, generate -----------------------------------------
    "run missing study": Case(["run", "{w}/nowhere.yaml"], "does not exist"),
    "run invalid yaml": Case(["run", "{w}/broken.yaml"], "not valid YAML"),
    "run study that is a list": Case(["run", "{w}/list.yaml"], "expected a mapping of settings"),
    "run medical mixed modality counts": Case(
        ["run", "{w}/med-mixed.yaml"], "subject 'b': no entry matching '*_t2.nii.gz'"
    ),
    "run medical subject missing from the CSV": Case(["run", "{w}/med-missing.yaml"], "subject 'c' (folder"),
    "run medical 4D NIfTI": Case(["run", "{w}/med-4d.yaml"], "must be one 3D volume"),
    "run medical file that is not NIfTI": Case(["run", "{w}/med-not-nifti.yaml"], "is not a readable NIfTI file"),
    "run named pretrained file missing": Case(["run", "{w}/missing-weights.yaml"], "put resnet50-11ad3fa6.pth"),
    "run medical DICOM folder with two series": Case(["run", "{w}/med-dicom.yaml"], "holds 2 series"),
    "run folds above the smallest class": Case(["run", "{w}/study-folds.yaml"], "cv.folds: 5 folds, but class"),
    "run volume not nifti": Case(["run", "{w}/study-volumes.yaml"], "1.nii.gz is not a readable NIfTI volume"),
    "run pickled extractor weights": Case(["run", "{w}/study-pickle.yaml"], "pickle.pt holds pickled Python objects"),
    "export-checkpoint missing run": Case(["export-checkpoint", "{w}/nowhere"], "does not exist"),
    "export-checkpoint empty folder": Case(["export-checkpoint", "{w}/empty-folder"], "checkpoints here: none"),
    "generate missing run": Case(
        ["generate", "{w}/nowhere", "--prompt", "hi"], "no such run directory or model folder"
    ),
    "generate empty folder": Case(["generate", "{w}/empty-folder", "--prompt", "hi"], "neither a tightfit run"),
    "generate without prompt": Case(["generate", "{w}/empty-folder"], "--prompt"),
    "predict missing artifact": Case(["predict", "{w}/nowhere.onnx", "{w}/input.npy"], "does not exist"),
    "predict wrong suffix": Case(["predict", "{w}/model.txt", "{w}/input.npy"], "is not an .onnx or .pt2 file"),
    "predict garbage onnx": Case(["predict", "{w}/model.onnx", "{w}/input.npy"], "cannot be loaded by ONNX Runtime"),
    "predict foreign pt2": Case(["predict", "{w}/model.pt2", "{w}/input.npy"], "--trust-pt2"),
    "predict garbage pt2 trusted": Case(
        ["predict", "{w}/model.pt2", "{w}/input.npy", "--trust-pt2"], "not a readable torch.export program"
    ),
    "predict corrupt report": Case(["predict", "{w}/report-folder", "{w}/input.npy"], "report.json is damaged"),
    "predict empty folder": Case(["predict", "{w}/empty-folder", "{w}/input.npy"], "no model.onnx or model.pt2"),
    "predict top-k zero": Case(["predict", "{w}/model.onnx", "{w}/input.npy", "--top-k", "nope"], "invalid int value"),
    # --- report ---------------------------------------------------------------------------
    "report missing path": Case(["report", "{w}/nowhere"], "no such file or folder"),
    "report damaged run summary": Case(["report", "{w}/damaged-run", "-o", "{w}/out.html"], "summary.json is damaged"),
    "report json list": Case(["report", "{w}/list.json", "-o", "{w}/out.html"], "not a tightfit report source"),
    "report binary json": Case(["report", "{w}/binary.json", "-o", "{w}/out.html"], "not valid JSON"),
    "report summary missing fields": Case(["report", "{w}/partial-run", "-o", "{w}/out.html"], "missing wall_time_s"),
    "report folder of something else": Case(["report", "{w}/empty-folder", "-o", "{w}/out.html"], "not a training run"),
    # --- lora, doctor, devices, the shell ---------------------------------------------------
    "lora info without adapters": Case(["lora", "info", "{w}/empty-folder"], "adapter"),
    "lora info adapters as bin": Case(
        ["lora", "info", "{w}/bin-adapters"], "adapter_model.bin: refused: a .bin is a pickle"
    ),
    "lora info truncated adapters": Case(
        ["lora", "info", "{w}/cut-adapters"], "adapter_model.safetensors: not a readable safetensors"
    ),
    "lora merge adapters as bin": Case(["lora", "merge", "{w}/bin-adapters"], "refused: a .bin is a pickle"),
    "lora merge without adapters": Case(["lora", "merge", "{w}/empty-folder"], "adapter"),
    "lora unknown action": Case(["lora", "split", "{w}/empty-folder"], "invalid choice"),
    "doctor missing data": Case(["doctor", "--data", "{w}/nowhere", "--no-smoke-test"], "does not exist"),
    "devices unknown profile": Case(["devices", "rtx9999"], "rtx9999"),
    "devices bad memory": Case(["devices", "--memory", "lots"], "lots"),
    "unknown command": Case(["trian"], "invalid choice"),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("workspace")
    populate(folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, workspace, capsys, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(workspace)  # relative paths a command might default to land here, and are seen
    before = snapshot(workspace)
    argv = [part.replace(W, str(workspace)) for part in case.argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == case.code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert case.fragment in lines[0], lines[0]
    assert snapshot(workspace) == before
    assert not (workspace / "PWNED").exists()


def test_the_matrix_covers_every_command():
    from tightfit.cli import COMMANDS

    covered = {case.argv[0] for case in CASES.values()}
    assert set(COMMANDS) <= covered
    assert len(CASES) >= 60


def test_a_truncated_image_read_in_a_worker_is_one_line(tmp_path, capsys):
    """The header is intact, so the listing keeps the file; decoding fails inside a DataLoader
    worker, whose re-raised error carries the worker's traceback in its message."""
    import numpy as np
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(6):
            pixels = (np.random.default_rng(index).random((8, 8, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    broken = tmp_path / "images" / "cat" / "3.png"
    broken.write_bytes(broken.read_bytes()[:-40])
    before = snapshot(tmp_path)
    code = main(
        [
            "train",
            "data.source=image-folder",
            f"data.path={tmp_path / 'images'}",
            "data.num_workers=1",
            "data.val_fraction=0",
            "data.test_fraction=0",
            "data.cache=false",
            "model=builtin:mlp",
            "model_options.in_features=192",
            "epochs=1",
            "logging.console=false",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "3.png: cannot decode image" in err
    assert all(snapshot(tmp_path)[name] == content for name, content in before.items())
