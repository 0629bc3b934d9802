"""``tightfit predict``: exported models run on images, tensor files and text without training
code, agree with the PyTorch model, name classes, and reject bad inputs with one-line errors."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from tightfit.cli import main
from tightfit.compression.export import export_onnx, export_program
from tightfit.compression.predictor import predict

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
METADATA = {
    "class_names": CLASS_NAMES,
    "input_shape": [1, 8, 8],
    "task": "classification",
    "normalization": {"mode": "unit", "scale": 16},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifacts")
    example = (torch.rand(2, 1, 8, 8), None)
    onnx_path = export_onnx(model, example, directory / "model.onnx", metadata=METADATA)
    program_path = export_program(model, example, directory / "model.pt2", metadata=METADATA)
    return {"onnx": onnx_path, "program": program_path}


@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(5, 1, 8, 8, generator=generator)


def expected_classes(model, inputs):
    with torch.no_grad():
        return model(inputs).argmax(1).tolist()


@pytest.mark.parametrize("kind", ["onnx", "program"])
def test_predictions_from_a_npy_file_match_the_pytorch_model(model, artifacts, samples, kind, tmp_path):
    path = tmp_path / "samples.npy"
    np.save(path, samples.numpy())
    results = predict(artifacts[kind], [str(path)], top_k=3)
    assert [r["top"][0]["class"] for r in results] == expected_classes(model, samples)
    assert all(r["top"][0]["name"] == CLASS_NAMES[r["top"][0]["class"]] for r in results)
    probabilities = [entry["probability"] for entry in results[0]["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == 3
    with torch.no_grad():
        reference = torch.softmax(model(samples[:1]), 1)[0].max().item()
    assert probabilities[0] == pytest.approx(reference, abs=1e-4)


def test_a_single_sample_pt_tensor_gets_a_batch_axis(model, artifacts, samples, tmp_path):
    path = tmp_path / "one.pt"
    torch.save(samples[2], path)  # shape (1, 8, 8): one sample without batch axis
    [result] = predict(artifacts["onnx"], [str(path)], top_k=1)
    assert result["top"][0]["class"] == expected_classes(model, samples[2:3])[0]


def test_images_are_resized_and_scaled_like_training(model, artifacts, tmp_path):
    from PIL import Image

    pixels = (np.arange(256).reshape(16, 16) % 251).astype(np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    scaled = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
    [result] = predict(artifacts["onnx"], [str(path)])
    assert result["top"][0]["class"] == expected_classes(model, torch.from_numpy(scaled)[None, None])[0]


def test_cli_json_output(model, artifacts, samples, tmp_path, capsys):
    path = tmp_path / "samples.npy"
    np.save(path, samples.numpy())
    assert main(["predict", str(artifacts["onnx"]), str(path), "--json", "--top-k", "2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["runtime"] == "onnx" and len(payload["predictions"]) == 5
    assert [p["top"][0]["class"] for p in payload["predictions"]] == expected_classes(model, samples)
    assert all(len(p["top"]) == 2 for p in payload["predictions"])


def test_a_compress_output_folder_resolves_to_its_best_onnx_artifact(artifacts, tmp_path, samples):
    import shutil

    step = tmp_path / "03-export"
    step.mkdir()
    shutil.copy(artifacts["onnx"], step / "model.onnx")
    (tmp_path / "report.json").write_text(
        json.dumps(
            {
                "best": {"fastest": "03-export onnx fp32"},
                "artifacts": [{"name": "03-export onnx fp32", "format": "onnx", "artifact": str(step / "model.onnx")}],
            }
        )
    )
    np.save(tmp_path / "x.npy", samples.numpy())
    results = predict(tmp_path, [str(tmp_path / "x.npy")])
    assert len(results) == 5


def test_non_classifier_outputs_are_returned_whole(tmp_path):
    regressor = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    path = export_onnx(regressor, (torch.rand(2, 4), None), tmp_path / "r.onnx")
    x = torch.rand(2, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    results = predict(path, [str(tmp_path / "x.npy")])
    assert results[0]["shape"] == [3]
    assert np.allclose(results[1]["output"], regressor(x)[1].detach().numpy(), atol=1e-5)


def test_text_models_are_tokenized_with_a_local_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "a", "very"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    batch = dict(tokenizer(["a good film", "very bad"], padding=True, return_tensors="pt"))
    path = export_onnx(
        model,
        batch,
        tmp_path / "text.onnx",
        metadata={"class_names": ["negative", "positive"], "tokenizer": str(tmp_path / "tokenizer")},
    )
    results = predict(path, ["a good film", "very bad"], text=True)
    with torch.no_grad():
        expected = model(**batch).logits.argmax(1).tolist()
    assert [r["top"][0]["class"] for r in results] == expected
    assert {r["top"][0]["name"] for r in results} <= {"negative", "positive"}


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: str(d / "missing.png"), "missing.png does not exist"),
        (lambda d: (d / "notes.txt").write_text("x") and str(d / "notes.txt"), "unsupported type .txt"),
        (
            lambda d: np.save(d / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32)) or str(d / "wrong.npy"),
            "inputs of shape [1, 8, 8]; got [3, 8, 8]",
        ),
        (
            lambda d: torch.save({"weights": torch.zeros(2)}, d / "dict.pt") or str(d / "dict.pt"),
            "holds a dict, not a tensor",
        ),
        (lambda d: (d / "broken.png").write_bytes(b"not an image") and str(d / "broken.png"), "not a readable image"),
    ],
)
def test_bad_inputs_get_one_line_errors_and_exit_2(artifacts, tmp_path, capsys, make_input, message):
    argument = make_input(tmp_path)
    assert main(["predict", str(artifacts["onnx"]), argument]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "artifact, message",
    [
        ("nowhere.onnx", "does not exist"),
        ("weights.safetensors", "is not an .onnx or .pt2 file"),
        ("bad.onnx", "cannot be loaded"),
    ],
)
def test_bad_artifacts_get_one_line_errors(tmp_path, capsys, artifact, message, samples):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    np.save(tmp_path / "x.npy", samples.numpy())
    assert main(["predict", str(tmp_path / artifact), str(tmp_path / "x.npy")]) == 2
    assert message in capsys.readouterr().err
