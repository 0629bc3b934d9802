"""The model/data contract checked before the first step, and models that take their sizes from the data."""

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tightfit.cli import main
from tightfit.errors import ConfigError, SpecError
from tightfit.models.spec import build_model_for_data
from tightfit.training.contract import check_model_data_contract
from tightfit.training.trainer import Trainer

QUIET = ["logging.console=false", "logging.tensorboard=false", "monitor.enabled=false", "threads=1"]


def classification_data(samples: int = 16, features: int = 4, classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, features, generator=generator), torch.arange(samples) % classes)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, inputs):
        return self.layer(inputs).detach()


def check(model: nn.Module, batch, num_classes=None) -> list[str]:
    return check_model_data_contract(
        model, batch, model_name="the model", num_classes=num_classes, precision="fp32", device=torch.device("cpu")
    )


def test_contract_passes_a_matching_classifier_and_leaves_the_model_and_rng_as_they_were():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    assert check(model, (torch.randn(1, 4), torch.tensor([2])), num_classes=3) == []
    assert model.training and torch.rand(1) != expected_next  # randn above drew; the check itself did not
    torch.manual_seed(3)
    check(model, (torch.zeros(1, 4), torch.tensor([2])), num_classes=3)
    assert torch.rand(1) == expected_next


@pytest.mark.parametrize(
    "model, batch, num_classes, message",
    [
        (
            nn.Conv2d(1, 1, 3, padding=1),
            (torch.randn(1, 1, 8, 8), torch.tensor([4])),
            10,
            "targets are class indices (10 classes) but the model outputs shape (1, 1, 8, 8)",
        ),
        (
            nn.Linear(4, 2),
            (torch.randn(1, 4), torch.tensor([1])),
            3,
            "outputs 2 classes but the data has 3; give its last layer 3 outputs",
        ),
        (
            nn.Linear(4, 2),
            (torch.randn(1, 4), torch.randn(1, 3)),
            None,
            "the targets have shape (1, 3) but the model outputs (1, 2)",
        ),
        (
            nn.Linear(64, 2),
            (torch.randn(1, 13), torch.tensor([1])),
            2,
            "the forward pass fails: mat1 and mat2 shapes cannot be multiplied",
        ),
        (nn.Linear(4, 2), torch.randn(1, 4), None, "the data has no targets and the model computes no loss of its own"),
        (
            nn.Linear(4, 2).requires_grad_(False),
            (torch.randn(1, 4), torch.tensor([1])),
            2,
            "no trainable parameter reaches the loss: every parameter is frozen",
        ),
        (
            Detached(),
            (torch.randn(1, 4), torch.tensor([1])),
            2,
            "no trainable parameter reaches the loss: the forward pass detaches its output",
        ),
    ],
)
def test_contract_refuses_what_would_train_on_the_wrong_loss_or_crash(model, batch, num_classes, message):
    with pytest.raises(ConfigError, match="^model the model on one training sample") as error:
        check(model, batch, num_classes)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_contract_notes_a_classifier_with_more_outputs_than_classes():
    notes = check(nn.Linear(4, 12), (torch.randn(1, 4), torch.tensor([1])), num_classes=10)
    assert notes == ["the model outputs 12 classes but the data has 10: 2 outputs are never the answer"]


def test_builtin_mlp_takes_its_input_width_and_class_count_from_the_data():
    model, inferred = build_model_for_data("builtin:mlp", {"hidden_sizes": [8]}, num_classes=3, input_shape=(13,))
    assert inferred == {"in_features": 13}
    assert model.layers[1].in_features == 13 and model.layers[-1].out_features == 3
    _, inferred = build_model_for_data("builtin:mlp", {"in_features": 64}, num_classes=3, input_shape=(13,))
    assert inferred == {}  # the recipe's own setting wins (and the contract then says it does not fit)


def test_num_classes_in_model_options_may_repeat_the_data_but_not_contradict_it():
    model, _ = build_model_for_data("builtin:mlp", {"num_classes": 3}, num_classes=3, input_shape=(4,))
    assert model.layers[-1].out_features == 3
    with pytest.raises(
        SpecError, match="model_options.num_classes: 5, but the data has 3 classes; remove model_options.num_classes"
    ):
        build_model_for_data("builtin:mlp", {"num_classes": 5}, num_classes=3, input_shape=(4,))


def test_trainer_refuses_a_mismatched_model_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    per_position = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)))  # (batch, 2, 3): no class axis
    with pytest.raises(ConfigError, match=r"model Sequential on one training sample .* outputs shape \(1, 2, 3\)"):
        Trainer(
            {"run_dir": str(run_dir), "logging": {"console": False}},
            model=per_position,
            datasets=(classification_data(), None, None),
        ).setup()
    assert not run_dir.exists()


def test_cli_unet_on_digits_labels_is_one_line_exit_2_and_mlp_trains_on_a_13_column_csv(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "model=builtin:unet-small",
                "epochs=1",
                "data.limit=64",
                *QUIET,
                "--run-dir",
                str(tmp_path / "unet"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("tightfit train: error: model builtin:unet-small on one training sample") and "\n" not in error
    )
    assert "use a classifier" in error and not (tmp_path / "unet").exists()

    table = tmp_path / "table.csv"
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(90, 13, generator=generator)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{index}" for index in range(13)] + ["label"])
        for row in features:
            writer.writerow([f"{value:.4f}" for value in row.tolist()] + [int(row[0] > 0) + int(row[1] > 1)])
    arguments = ["train", "model=builtin:mlp", "data.source=csv", f"data.path={table}", "epochs=1", *QUIET]
    assert main([*arguments, "--run-dir", str(tmp_path / "mlp"), "--json"]) == 0
    assert main([*arguments, "model_options.in_features=64", "--run-dir", str(tmp_path / "mlp64")]) == 2
    assert "leave out model_options.in_features: builtin:mlp takes it from the data" in capsys.readouterr().err
