"""One test per row of docs/security.md's deserialisation table: each reader is handed a file that
would run a shell command if it were unpickled or imported, and each refuses it in one line
without running it (the marker file stays absent)."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tightfit.cli import main
from tightfit.errors import TightfitError


class ShellPayload:
    """Pickles to ``os.system("touch MARKER")``: unpickling it runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_payload(marker: Path, wrap=lambda payload: payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(wrap(ShellPayload(marker)), buffer)
    return buffer.getvalue()


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the payload ran"


def refused_in_one_line(capsys, argv: list[str], *words: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


# --- YAML: yaml.safe_load builds only plain data; python tags are refused -------------------


def yaml_payload(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]\n'


@pytest.mark.parametrize("reader", ["train recipe", "compression recipe", "pipeline", "compress --data"])
def test_yaml_python_tags_are_refused(reader, tmp_path, marker, capsys):
    path = tmp_path / "file.yaml"
    path.write_text(yaml_payload(marker))
    argv = {
        "train recipe": ["train", str(path)],
        "compression recipe": [
            "compress",
            "builtin:digits-cnn",
            "--data",
            "digits",
            "--recipe",
            str(path),
            "-o",
            str(tmp_path / "o"),
        ],
        "pipeline": ["plan", str(path)],
        "compress --data": ["compress", "builtin:digits-cnn", "--data", str(path), "-o", str(tmp_path / "o")],
    }[reader]
    refused_in_one_line(capsys, argv, "YAML")


# --- checkpoints: weights through safetensors, state through torch.load(weights_only=True) ---


def test_a_pickle_posing_as_safetensors_weights_is_refused(tmp_path, marker, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(pickled_payload(marker))
    refused_in_one_line(
        capsys,
        ["compress", "builtin:digits-cnn", "--data", "digits", "--checkpoint", str(weights), "-o", str(tmp_path / "o")],
        "not a safetensors file",
    )


# state.pt: tests/test_damaged_runs.py::test_a_damaged_last_resumes_from_the_newest_intact_checkpoint[malicious state]


# --- data files: np.load(allow_pickle=False), torch.load(weights_only=True), safetensors -----


def test_a_pickled_data_file_is_refused(tmp_path, marker, capsys):
    path = tmp_path / "data.pt"
    path.write_bytes(pickled_payload(marker, wrap=lambda payload: {"inputs": payload}))
    refused_in_one_line(
        capsys,
        ["train", "data.source=tensors", f"data.path={path}", "--run-dir", str(tmp_path / "r")],
        "Python objects",
    )
    objects = tmp_path / "data.npz"
    np.savez(objects, inputs=np.array([ShellPayload(marker)], dtype=object), targets=np.zeros(1))
    refused_in_one_line(
        capsys, ["train", "data.source=tensors", f"data.path={objects}", "--run-dir", str(tmp_path / "r")], "data.npz"
    )


def test_a_pickle_in_the_data_cache_is_a_miss_not_a_load(tmp_path, marker):
    from tightfit.data.cache import TensorCache

    cache = TensorCache(tmp_path, "images")
    entry = cache._path("ab" + "0" * 62)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(pickled_payload(marker))
    assert cache.load("ab" + "0" * 62) is None and cache.misses == 1


# --- predict inputs: .npy without pickle, .pt with weights_only ------------------------------


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from tightfit.compression.export import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(model, (torch.rand(2, 4), None), path, metadata={"input_shape": [4]})


def test_pickled_predict_inputs_are_refused(onnx_model, tmp_path, marker, capsys):
    tensor_file = tmp_path / "x.pt"
    tensor_file.write_bytes(pickled_payload(marker))
    refused_in_one_line(capsys, ["predict", str(onnx_model), str(tensor_file)], "x.pt")
    array_file = tmp_path / "x.npy"
    np.save(array_file, np.array([ShellPayload(marker)], dtype=object), allow_pickle=True)
    refused_in_one_line(capsys, ["predict", str(onnx_model), str(array_file)], "x.npy")


# --- ONNX: protobuf, no code --------------------------------------------------------------


def test_a_pickle_posing_as_onnx_is_refused(tmp_path, marker, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(pickled_payload(marker))
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.ones((1, 4), dtype=np.float32))
    refused_in_one_line(capsys, ["predict", str(path), str(inputs)], "cannot be loaded by ONNX Runtime")


# .pt2 archives: tests/test_trust.py::test_a_planted_pt2_is_refused_by_file_and_by_folder


# --- Hugging Face, PEFT and diffusers folders ---------------------------------------------


def hf_folder(tmp_path: Path, marker: Path, *, remote_code: bool) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "vocab_size": 30,
        "max_position_embeddings": 16,
    }
    if remote_code:  # a folder asking to run its own Python (transformers' auto_map)
        config = {
            "model_type": "evil",
            "auto_map": {
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModel": "modeling_evil.EvilModel",
                "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
            },
        }
        code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
            (folder / name).write_text(code)
        (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": config["auto_map"]}))
    else:  # weights in a pickle that builds objects
        (folder / "pytorch_model.bin").write_bytes(pickled_payload(marker, wrap=lambda payload: {"x": payload}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_hf_folder_never_runs_its_own_code(tmp_path, marker, capsys):
    folder = hf_folder(tmp_path, marker, remote_code=True)
    refused_in_one_line(capsys, ["plan", "--model", f"hf:{folder}", "--input", "tokens:8"], "custom code")
    from tightfit.compression.predictor import Artifact, _text_feeds

    artifact = Artifact(tmp_path, "onnx", ["input_ids"], ["int64"], {}, None)
    with pytest.raises(TightfitError, match="tokenizer .* cannot be loaded"):
        _text_feeds(artifact, ["hello"], str(folder))


def test_an_hf_pickle_weights_file_is_refused(tmp_path, marker, capsys):
    from tightfit.errors import SpecError
    from tightfit.models.spec import build_model

    folder = hf_folder(tmp_path, marker, remote_code=False)
    with pytest.raises(SpecError, match="Weights only load failed") as error:
        build_model(f"hf:{folder}")
    assert "\n" not in str(error.value)


def test_a_peft_adapter_pickle_is_refused(tmp_path, marker):
    pytest.importorskip("peft")
    from tightfit.models.lora import (
        LoRAConfig,
        apply_lora,
        load_adapters,
        save_adapters,
    )

    model = apply_lora(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), LoRAConfig(target_modules=["0"])
    )
    directory = tmp_path / "adapters"
    save_adapters(model, directory)
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(pickled_payload(marker, wrap=lambda payload: {"x": payload}))
    with pytest.raises(TightfitError, match="cannot be loaded safely") as error:
        load_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), directory)
    assert "\n" not in str(error.value)


def test_a_diffusers_pickle_weights_file_is_refused(tmp_path, marker):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from tightfit.errors import SpecError
    from tightfit.models.diffusion import _load

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickled_payload(marker, wrap=lambda payload: {"x": payload}))
    with pytest.raises(SpecError, match="cannot be loaded safely"):
        _load(UNet2DConditionModel, folder, meta=False)


def test_the_shipped_loaders_are_the_safe_ones():
    """The source keeps to the table: no pickle.load, no weights_only=False, no allow_pickle=True,
    no trust_remote_code=True, YAML only through safe_load."""
    source = Path(__file__).resolve().parents[1] / "src" / "tightfit"
    text = "\n".join(path.read_text() for path in source.rglob("*.py"))
    for unsafe in (
        "pickle.load(",
        "pickle.loads(",
        "weights_only=False",
        "allow_pickle=True",
        "trust_remote_code=True",
        "yaml.load(",
        "yaml.unsafe_load",
        "joblib.load",
        "dill.load",
        "marshal.load",
    ):
        assert unsafe not in text, unsafe
    assert text.count("torch.load(") == text.count("weights_only=True)")
