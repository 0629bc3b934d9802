"""Compression steps: each changes what it should (sparsity, parameters, int8), accuracy holds,
exports agree with PyTorch, the report has every field, bad recipes get clear errors."""

import json

import pytest
import torch
from torch import nn

from conftest import run_tightfit
from tightfit.compression import (
    FinetuneSettings,
    MagnitudePruner,
    PolynomialSchedule,
    Source,
    compress,
    distill,
    export,
    finetune,
    prune,
    qat,
    quantize,
    sparsity_table,
    structured_prune,
)
from tightfit.compression.distill import distillation_loss
from tightfit.compression.export import VerificationError, export_onnx, onnx_feeds, verify_onnx
from tightfit.compression.prune import count_parameters, recalibrate_batchnorm
from tightfit.compression.quantize import is_quantized, model_kind
from tightfit.compression.report import REPORT_FIELDS
from tightfit.errors import ConfigError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core CI box, two OpenMP threads competing with other
    processes make these tiny models 10-20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_cnn(width: int = 8) -> nn.Module:
    from tightfit.models.spec import build_model

    return build_model("builtin:digits-cnn", num_classes=10, width=width)


@pytest.fixture(scope="module")
def digits():
    from tightfit.data.build import build_datasets
    from tightfit.data.config import DataConfig

    return build_datasets(DataConfig(), seed=0)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory, one_thread):
    """A small digits CNN trained through the trainer (a few seconds)."""
    torch.manual_seed(0)
    model = tiny_cnn(16)
    finetune(model, digits, FinetuneSettings(epochs=6, lr=1e-2), run_dir=tmp_path_factory.mktemp("base"))
    return model.eval()


def held_out(digits):
    inputs = torch.stack([digits.test[i][0] for i in range(len(digits.test))])
    targets = torch.tensor([int(digits.test[i][1]) for i in range(len(digits.test))])
    return inputs, targets


def accuracy(model, digits) -> float:
    inputs, targets = held_out(digits)
    model.eval()
    with torch.inference_mode():
        return 100.0 * float((model(inputs).argmax(1) == targets).float().mean())


# ------------------------------------------------------------------------------------- pruning
def test_polynomial_schedule_follows_tf_polynomial_decay():
    schedule = PolynomialSchedule(0.1, 0.5, begin_step=10, end_step=110, frequency=25)
    assert schedule.sparsity_at(0) == 0.1 and schedule.sparsity_at(10) == 0.1
    assert schedule.sparsity_at(110) == 0.5 and schedule.sparsity_at(500) == 0.5
    assert schedule.sparsity_at(60) == pytest.approx(0.5 + (0.1 - 0.5) * 0.5**3)
    assert [s for s in range(0, 130) if schedule.updates_at(s)] == [10, 35, 60, 85, 110]


@pytest.mark.parametrize("bad", [dict(final_sparsity=1.0), dict(begin_step=5, end_step=5), dict(frequency=0)])
def test_polynomial_schedule_rejects_bad_settings(bad):
    with pytest.raises(ConfigError, match="prune"):
        PolynomialSchedule(**bad)


def test_global_magnitude_pruning_reaches_exact_sparsity_and_masks_only_grow():
    torch.manual_seed(0)
    model = tiny_cnn(8)
    pruner = MagnitudePruner(model, scope="global")
    pruner.set_sparsity(0.3)
    zeros_at_30 = {
        row["layer"]: (dict(model.named_modules())[row["layer"]].weight == 0).clone() for row in sparsity_table(model)
    }
    pruner.set_sparsity(0.6)
    rows = sparsity_table(model)
    total = sum(row["parameters"] for row in rows)
    assert sum(row["zeros"] for row in rows) == round(0.6 * total)
    modules = dict(model.named_modules())
    for name, was_zero in zeros_at_30.items():
        assert bool((modules[name].weight[was_zero] == 0).all()), f"{name}: a pruned weight came back"
    # global: layers are pruned unevenly (small first conv vs big last conv)
    assert len({round(row["sparsity"], 2) for row in rows}) > 1
    pruner.make_permanent()
    assert not any(hasattr(module, "weight_orig") for module in model.modules())
    assert sum(row["zeros"] for row in sparsity_table(model)) == round(0.6 * total)


def test_layer_magnitude_pruning_prunes_every_layer_equally_and_excludes():
    model = tiny_cnn(8)
    pruner = MagnitudePruner(model, scope="layer", exclude=["classifier.1"])
    pruner.set_sparsity(0.5)
    for row in sparsity_table(model):
        if row["layer"] == "classifier.1":
            assert row["zeros"] == 0
        else:
            assert row["zeros"] == round(0.5 * row["parameters"])
    with pytest.raises(ConfigError, match="unknown module"):
        MagnitudePruner(tiny_cnn(8), exclude=["classifer"])


def test_structured_pruning_physically_shrinks_the_model():
    torch.manual_seed(0)
    model = tiny_cnn(16).eval()
    example = torch.randn(2, 1, 8, 8)
    before = count_parameters(model)[0]
    result = structured_prune(model, example, ratio=0.5, num_classes=10)
    after = count_parameters(model)[0]
    assert after == result.parameters_after < 0.4 * before  # conv weights scale with in x out channels
    assert result.macs_after < 0.4 * result.macs_before
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert model(example).shape == (2, 10)  # the classifier keeps its 10 classes


def test_batchnorm_recalibration_re_estimates_statistics(digits):
    model = tiny_cnn(8)
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    norm.running_mean.fill_(5.0)
    loader = torch.utils.data.DataLoader(digits.train, batch_size=64)
    assert recalibrate_batchnorm(model, loader, max_batches=3) == 3
    assert float(norm.running_mean.abs().max()) < 5.0
    assert norm.momentum == 0.1  # restored


def test_magnitude_pruning_with_schedule_during_finetuning_keeps_accuracy(trained, digits, tmp_path):
    import copy

    model = copy.deepcopy(trained)
    baseline = accuracy(model, digits)
    result = prune(
        model, digits, method="magnitude", sparsity=0.5, finetune=FinetuneSettings(epochs=2, lr=1e-3), run_dir=tmp_path
    )
    updates = result.details["schedule"]["updates"]
    assert updates[0][1] == 0.0 and updates[-1][1] == 0.5 and len(updates) > 3  # sparsity grew in steps
    zeros = sum(row["zeros"] for row in result.table)
    assert zeros == round(0.5 * sum(row["parameters"] for row in result.table))
    # measured drop (points), seeds 0-4 x 1 and 2 threads (/tmp spread script in the i20a report):
    # 0.00-0.74 so far; 2.0 leaves a margin over the worst (it was 1.0: 0.74 is too close)
    assert accuracy(model, digits) >= baseline - 2.0


def test_structured_pruning_with_finetune_keeps_accuracy(trained, digits, tmp_path):
    import copy

    model = copy.deepcopy(trained)
    baseline = accuracy(model, digits)
    result = prune(
        model,
        digits,
        method="structured",
        sparsity=0.5,
        example_inputs=torch.randn(2, 1, 8, 8),
        num_classes=10,
        finetune=FinetuneSettings(epochs=5, lr=3e-3),
        run_dir=tmp_path,
    )
    assert result.details["parameters_after"] < 0.4 * result.details["parameters_before"]
    assert result.details["batchnorm_batches"] > 0
    # measured drop (points), seeds 0-4 x 1 and 2 threads: 0.74-1.86 here, and 2.23 once in a fresh
    # clone's make test (97.77 % from 100 %, issue 20); 3.5 is below the worst with a margin
    assert accuracy(model, digits) >= baseline - 3.5


# ------------------------------------------------------------------------------------- quantization
def test_dynamic_quantization_makes_linear_layers_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    result = quantize(model, "dynamic")
    assert is_quantized(result.model) and not is_quantized(model)
    assert type(result.model[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(8, 64)
    assert torch.allclose(result.model(x), model(x), atol=0.05)


def test_static_quantization_of_the_cnn_keeps_accuracy(trained, digits):
    calibration = list(torch.utils.data.DataLoader(digits.train, batch_size=64))[:8]
    example = (held_out(digits)[0][:1], None)
    result = quantize(trained, "static", example_batch=example, calibration_batches=calibration)
    quantized_convs = [
        m for m in result.model.modules() if "quantized" in type(m).__module__ and "Conv" in type(m).__name__
    ]
    assert quantized_convs and is_quantized(result.model)
    assert accuracy(result.model, digits) >= accuracy(trained, digits) - 1.0


def test_weight_only_quantization_stores_int8_weights():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    result = quantize(model, "weight-only")
    assert "Int8" in type(result.model[0].weight).__name__
    x = torch.randn(4, 64)
    assert torch.allclose(result.model(x), model(x), atol=0.05)


def test_auto_quantization_never_keeps_a_slower_model(trained, digits):
    calibration = list(torch.utils.data.DataLoader(digits.train, batch_size=64))[:4]
    result = quantize(
        trained, "auto", example_batch=(held_out(digits)[0][:1], None), calibration_batches=calibration, threads=1
    )
    assert model_kind(trained) == "conv" and result.candidates[1]["method"] == "static"
    timings = {row["method"]: row.get("median_ms") for row in result.candidates}
    if result.method == "none":
        assert result.model is not trained and not is_quantized(result.model)
    else:
        assert timings[result.method] < timings["fp32"]
        assert timings[result.method] == min(t for t in timings.values() if t is not None)


def test_unknown_quantize_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method must be one of"):
        quantize(nn.Linear(2, 2), "int4")


# ------------------------------------------------------------------------------------- distillation, QAT
def test_distillation_loss_is_kl_times_t_squared_plus_hard_loss():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    t, alpha = 3.0, 0.7
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    expected = alpha * kl * t * t + (1 - alpha) * nn.functional.cross_entropy(student, labels)
    assert distillation_loss(student, teacher, labels, temperature=t, alpha=alpha) == pytest.approx(
        float(expected), rel=1e-5
    )
    assert float(distillation_loss(teacher, teacher, None, temperature=t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_through_the_trainer_brings_the_student_to_the_teacher(trained, digits, tmp_path):
    torch.manual_seed(1)
    student = tiny_cnn(8)
    inputs, _ = held_out(digits)

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return float(distillation_loss(student(inputs), trained(inputs), None, temperature=4.0))

    before = gap()
    distill(
        student,
        trained,
        digits,
        temperature=4.0,
        alpha=0.7,
        settings=FinetuneSettings(epochs=6, lr=1e-2),
        run_dir=tmp_path,
    )
    assert gap() < 0.2 * before
    assert accuracy(student, digits) > 90.0
    assert all(p.requires_grad for p in student.parameters())
    assert all(p.requires_grad for p in trained.parameters())  # the teacher is given back unfrozen


def test_qat_converts_to_int8_and_keeps_accuracy(trained, digits, tmp_path):
    quantized = qat(
        trained,
        digits,
        (torch.randn(2, 1, 8, 8),),
        settings=FinetuneSettings(epochs=1, lr=1e-4, max_steps=10),
        run_dir=tmp_path,
    )
    assert is_quantized(quantized)
    assert accuracy(quantized, digits) >= accuracy(trained, digits) - 2.0


# ------------------------------------------------------------------------------------- export
def test_onnx_export_agrees_with_pytorch_at_any_batch_size(trained, digits, tmp_path):
    inputs, _ = held_out(digits)
    files = export(
        trained,
        (inputs[:1], None),
        tmp_path,
        verify_batches=[(inputs, None)],
        calibration_batches=list(torch.utils.data.DataLoader(digits.train, batch_size=32))[:3],
    )
    check = files["onnx_verification"]
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0 and check["samples"] == len(inputs)
    assert files["onnx_int8_verification"]["top1_agreement"] >= 0.95
    import onnx

    graph = onnx.load(files["onnx_int8"]).graph
    assert any(node.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for node in graph.node)
    loaded = torch.export.load(files["program"]).module()
    assert torch.allclose(loaded(inputs[:5]), trained(inputs[:5]), atol=1e-5)


def test_an_exported_model_that_disagrees_is_deleted(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.randn(16, 1, 8, 8)
    path = export_onnx(model, (x[:2], None), tmp_path / "m.onnx")
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(VerificationError, match="disagrees"):
        verify_onnx(path, other, [(x, None)])
    assert not path.exists()
    assert len(onnx_feeds((x, None))["input"]) == 16


# ------------------------------------------------------------------------------------- pipeline + report
def test_pipeline_report_has_every_field_and_flags_correctly(trained, digits, tmp_path):
    source = Source(
        trained,
        digits,
        "digits-test",
        "builtin:digits-cnn",
        {"class_names": digits.class_names, "input_shape": [1, 8, 8]},
    )
    recipe = {
        "steps": [
            {"step": "prune", "sparsity": 0.5, "finetune": {"epochs": 1, "lr": 1e-3}},
            {"step": "quantize", "method": "static", "calibration_batches": 4},
            {"step": "export", "calibration_batches": 4},
        ],
        "repeats": 5,
        "warmup": 2,
        "threads": 1,
        "latency_batch_size": 16,
    }
    report = compress(source, recipe, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["best"] == report["best"]
    names = [a["name"] for a in report["artifacts"]]
    assert names[0] == "original" and any("onnx fp32" in n for n in names) and any("onnx int8" in n for n in names)
    for artifact in report["artifacts"]:
        assert set(REPORT_FIELDS) <= set(artifact)
        assert set(artifact["latency"]) == {"batch_1", "batch_16"}
        assert artifact["latency"]["batch_1"]["threads"] == 1
        assert artifact["latency"]["batch_1"]["p90_ms"] >= artifact["latency"]["batch_1"]["median_ms"] > 0
        assert artifact["size_bytes"] > 0 and artifact["metric"]["name"] == "accuracy"
        slower = artifact["speedup"] < 1 / 1.05
        assert slower == any(flag.startswith("slower") for flag in artifact["flags"])
        dropped = artifact["metric_change"] is not None and artifact["metric_change"] < -1.0
        assert dropped == any("dropped" in flag for flag in artifact["flags"])
    pruned = report["artifacts"][1]
    assert pruned["nonzero_parameters"] < 0.6 * pruned["parameters"]
    assert pruned["gzip_bytes"] < report["artifacts"][0]["gzip_bytes"]  # zeros compress
    assert report["artifacts"][2]["size_bytes"] < 0.5 * report["artifacts"][0]["size_bytes"]  # int8
    assert (tmp_path / "out" / "size_vs_metric.png").stat().st_size > 1000
    assert (tmp_path / "out" / "latency_vs_metric.png").is_file()
    assert report["best"]["fastest"] in names
    fastest = next(a for a in report["artifacts"] if a["name"] == report["best"]["fastest"])
    assert not fastest["flags"]


def test_pipeline_structured_distill_qat_branches(trained, digits, tmp_path):
    source = Source(trained, digits, "digits-test")
    recipe = {
        "steps": [
            {"step": "prune", "method": "structured", "sparsity": 0.5},
            {"step": "distill", "temperature": 2.0, "alpha": 0.5},
            {"step": "qat", "finetune": {"epochs": 1, "max_steps": 5, "lr": 1e-4}},
            {"step": "quantize"},
        ],
        "finetune": {"epochs": 1, "lr": 3e-3},
        "repeats": 5,
        "warmup": 2,
        "threads": 1,
        "latency_batch_size": 8,
    }
    report = compress(source, recipe, tmp_path / "out")
    original, structured, distilled, quantized = report["artifacts"]  # quantize: already int8, no new row
    assert structured["parameters"] < 0.4 * original["parameters"]
    assert structured["details"]["batchnorm_batches"] > 0
    assert distilled["parameters"] == structured["parameters"]  # the student is the pruned model
    assert quantized["step"] == "03-qat" and quantized["size_bytes"] < 0.5 * structured["size_bytes"]
    assert all(a["seconds"] > 0 for a in report["artifacts"][1:])
    assert report["machine_load"]["before"]["cores"] >= 1


def test_an_existing_report_is_not_overwritten(trained, digits, tmp_path):
    (tmp_path / "report.json").write_text('{"keep": true}')
    with pytest.raises(ConfigError, match="already holds a report"):
        compress(Source(trained, digits, "x"), {"steps": [{"step": "export"}]}, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == {"keep": True}


# ------------------------------------------------------------------------------------- recipes and CLI


def run_in_process(capsys, *args):
    """The command line in this process (same code path as the ``tightfit`` script): (code, stderr)."""
    from tightfit.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_shipped_recipe_is_valid():
    from pathlib import Path

    from tightfit.compression.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "compress-digits.yaml")
    assert [step.step for step in recipe.steps] == ["prune", "quantize", "export"]


@pytest.mark.parametrize(
    "recipe_text, message",
    [
        ("steps:\n  - step: prune\n    sparsty: 0.5\n", "steps[0].sparsty: unknown key; did you mean 'sparsity'?"),
        ("steps:\n  - step: quantise\n", "did you mean 'quantize'?"),
        ("tolerence: 2\n", "tolerence: unknown key; did you mean 'tolerance'?"),
        ("steps:\n  - step: prune\n    sparsity: 1.5\n", "steps[0].sparsity"),
        ("steps: [oops\n", "not valid YAML"),
    ],
)
def test_bad_recipes_get_one_line_errors_and_exit_2(tmp_path, recipe_text, message, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    code, stderr = run_in_process(
        capsys,
        "compress",
        "builtin:digits-cnn",
        "--data",
        "digits",
        "--output",
        str(tmp_path / "o"),
        "--recipe",
        str(recipe),
    )
    assert code == 2, stderr
    assert message in stderr and str(recipe) in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs-that-do-not-exist"], "neither a run directory nor a model spec"),
        (
            ["builtin:digits-cnn", "--data", "digits", "--output", "o", "--recipe", "missing.yaml"],
            "missing.yaml does not exist",
        ),
        (
            ["builtin:digits-cnn", "--data", "digits", "--output", "o", "--checkpoint", "missing.safetensors"],
            "missing.safetensors does not exist",
        ),
        (
            ["builtin:digits-cnn", "--data", "digits", "--output", "o", "--steps", "prune,quantise"],
            "unknown step 'quantise'; did you mean 'quantize'?",
        ),
        (["builtin:digits-cnn", "--output", "o"], "give the data too"),
    ],
)
def test_missing_files_and_bad_options_get_clear_errors(tmp_path, args, message, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, stderr = run_in_process(capsys, "compress", *args)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compress_command_on_a_run_directory(tmp_path, capsys):
    from tightfit.training.trainer import Trainer

    run_dir = tmp_path / "run"
    config = {
        "model": "builtin:digits-cnn",
        "model_options": {"width": 8},
        "epochs": 2,
        "run_dir": str(run_dir),
        "device": "cpu",
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
        "optimizer": {"lr": 0.01},
        "data": {"limit": 400},
    }
    Trainer(config).fit()
    result = run_tightfit(
        "compress", str(run_dir), "--steps", "prune,export", "--epochs", "1", "--threads", "1", "--json"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [a["step"] for a in report["artifacts"]] == ["original", "01-prune", "02-export", "02-export"]
    assert (run_dir / "compressed" / "02-export" / "model.int8.onnx").is_file()
    code, stderr = run_in_process(capsys, "compress", str(run_dir), "--steps", "export")
    assert code == 2 and "already holds a report" in stderr
    assert json.loads((run_dir / "compressed" / "report.json").read_text())["artifacts"][1]["step"] == "01-prune"


def test_structured_pruning_removes_attention_heads_of_a_transformer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    result = structured_prune(model, batch, ratio=0.5, num_classes=3)
    attention = model.bert.encoder.layer[0].attention.self
    assert result.pruned_heads == {"bert.encoder.layer.0.attention.self": 2, "bert.encoder.layer.1.attention.self": 2}
    assert attention.num_attention_heads == 2 and attention.query.out_features == 2 * attention.attention_head_size
    assert result.parameters_after < 0.5 * result.parameters_before
    assert model(**batch).logits.shape == (2, 3)


# ------------------------------------------------------------------------------------- latency measurement
def test_latency_is_timed_after_warmup_with_threads_stated_and_restored():
    from tightfit.compression.benchmark import measure_torch_latency

    calls = []
    model = nn.Linear(8, 4)
    model.register_forward_hook(lambda *args: calls.append(1))
    before = torch.get_num_threads()
    latency = measure_torch_latency(model, (torch.randn(5, 8), None), threads=1, warmup=3, repeats=7)
    assert len(calls) == 3 + latency.repeats and latency.repeats >= 7
    assert latency.batch_size == 5 and latency.threads == 1
    assert latency.p90_ms >= latency.median_ms > 0
    assert latency.throughput == pytest.approx(5 / (latency.median_ms / 1e3))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "flags, fast",
    [("fpu sse avx2 avx512f avx512_vnni", True), ("fpu sse avx2", False), ("fp asimd asimddp", True)],
)
def test_int8_instruction_check_reads_cpu_flags(tmp_path, flags, fast):
    from tightfit.compression.benchmark import cpu_int8_support

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    result = cpu_int8_support(str(cpuinfo))
    assert result["fast_int8"] is fast
    assert (result["warning"] is None) is fast
