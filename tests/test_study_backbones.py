"""Backbones of a study on 1- or 4-channel input: the first layer adapted as timm does, weights from a local file."""

import numpy as np
import pytest
import torch
import yaml

from tightfit.study.backbone import (
    adapt_input_channels,
    adapt_input_conv,
    load_backbone_weights,
    read_state_dict,
)

torchvision = pytest.importorskip("torchvision")


def test_adapt_input_conv_sums_for_one_channel_and_repeats_scaled_otherwise():
    weight = torch.randn(5, 3, 3, 3)
    assert torch.equal(adapt_input_conv(weight, 1), weight[:, 0:1] + weight[:, 1:2] + weight[:, 2:3])
    four = adapt_input_conv(weight, 4)
    expected = torch.cat([weight, weight[:, :1]], dim=1) * 3 / 4  # by hand: R G B R, times 3/C
    assert four.shape == (5, 4, 3, 3) and torch.allclose(four, expected)
    assert torch.equal(adapt_input_conv(weight, 3), weight)


def test_one_channel_resnet50_from_a_local_pth_equals_the_rgb_model_on_grey_images(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50-local.pth"
    torch.save(rgb.state_dict(), path)  # a torchvision .pth, read back with weights_only=True
    grey = torchvision.models.resnet50(weights=None)
    load_backbone_weights(grey, read_state_dict(path))
    note = adapt_input_channels(grey, 1)
    assert "adapted from 3 to 1" in note and "summed" in note
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(grey.eval()(image), rgb(image.repeat(1, 3, 1, 1)), atol=1e-4)


def test_vit_patch_embedding_takes_four_modalities(tmp_path):
    from tightfit.models.spec import build_model

    vit = build_model("builtin:vit", num_classes=2, image_size=8, patch_size=4, in_channels=3, dim=16, depth=1, heads=2)
    note = adapt_input_channels(vit, 4)
    assert "patch_embedding" in note and "3/4" in note
    assert vit(torch.rand(2, 4, 8, 8)).shape == (2, 2)


def test_a_study_arm_on_one_channel_slices_from_local_weights_and_one_from_random(tmp_path):
    from medical_files import write_nifti
    from tightfit.cli import main
    from tightfit.study.features import read_features

    pytest.importorskip("monai")
    root = tmp_path / "brats"
    rows = ["subject,label"]
    for number in range(6):
        write_nifti(root / f"s{number}" / f"s{number}_t1.nii.gz", np.random.default_rng(number).random((16, 16, 4)) + 1)
        rows.append(f"s{number},{'ab'[number % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    study = {
        "name": "weights",
        "folder": str(tmp_path / "study"),
        "device": "cpu",
        "threads": 1,
        "data": {
            "source": "medical",
            "path": str(root),
            "labels": str(root / "labels.csv"),
            "development_fraction": 0,
            "modalities": ["*_t1.nii.gz"],
        },
        "cv": {"folds": 2},
        "tracking": {"mlflow": False},
        "stages": [
            {
                "name": "pretrained",
                "kind": "extract",
                "model": "torchvision:resnet18",
                "weights": str(tmp_path / "resnet18.pth"),
                "slices": {"axis": 2, "aggregate": "mean"},
                "normalize": "imagenet",
            },
            {"name": "random", "kind": "extract", "model": "torchvision:resnet18", "slices": {"axis": 2}},
            {"name": "classify", "kind": "classify", "from": ["pretrained", "random"], "classifiers": ["logreg"]},
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["run", str(tmp_path / "study.yaml")]) == 0
    assert read_features(tmp_path / "study/stages/pretrained/features").features.shape == (6, 512)
    results = (tmp_path / "study/results.json").read_text()
    assert "weights from" in results and "adapted from 3 to 1 input channels" in results
    assert "starts from random weights" in results
