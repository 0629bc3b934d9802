"""LoRA runs checkpoint their adapters only; an int8-base LoRA run trained by the real trainer
survives SIGKILL and ``--resume`` with the same final adapters as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("peft")
pytest.importorskip("torchao")

from tightfit.errors import TightfitError  # noqa: E402
from tightfit.training.trainer import Trainer  # noqa: E402

# digits through builtin:mlp (two hidden Linear layers quantized to int8, the head trained in full),
# dropout on the adapters (RNG), AdamW, cosine, 2 epochs of 6 steps, "last" every 3 steps.
CONFIG = {
    "model": "builtin:mlp",
    "data": {"source": "digits", "limit": 48},
    "lora": {
        "rank": 4,
        "alpha": 8,
        "dropout": 0.1,
        "quantize_base": "int8",
        "target_modules": ["layers.1", "layers.3"],
    },
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"name": "cosine", "warmup_steps": 2},
    "batch": {"micro_batch_size": 8},
    "epochs": 2,
    "seed": 3,
    "device": "cpu",
    "precision": "fp32",
    "checkpoint": {"every_n_steps": 3},
    "logging": {"console": False, "tensorboard": False},
    "monitor": {"enabled": False},
    "threads": 1,
}

RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from tightfit.training.trainer import Trainer

    run_dir, mode, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = json.loads(sys.argv[4]) | {"run_dir": run_dir}

    class SlowDown:
        def on_step_end(self, trainer, metrics):
            time.sleep(delay)

    Trainer(config, callbacks=[SlowDown()]).fit(resume_from=run_dir if mode == "resume" else None)
    """
)


def _start(tmp_path: Path, run_dir: Path, mode: str, delay: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    command = [sys.executable, str(script), str(run_dir), mode, str(delay), json.dumps(CONFIG)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def test_mlp_layer_names_are_what_the_config_targets():
    from tightfit.models.spec import build_model

    names = {name for name, module in build_model("builtin:mlp").named_modules() if isinstance(module, torch.nn.Linear)}
    assert {"layers.1", "layers.3"} <= names


def test_int8_lora_run_checkpoints_adapters_only_and_resumes_after_sigkill(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference = _start(tmp_path, uninterrupted, "fresh")
    victim = _start(tmp_path, interrupted, "fresh", delay=0.2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # every_n_steps writes the periodic checkpoints step-N (resumable) beside last
        periodic = sorted(
            (interrupted / "checkpoints").glob("step-*/meta.json"), key=lambda path: int(path.parent.name[5:])
        )
        meta = json.loads(periodic[-1].read_text()) if periodic else None
        if meta and meta["step"] >= 9 and not meta["epoch_finished"]:  # mid-way through the second epoch
            break
        time.sleep(0.05)
    else:
        victim.kill()
        pytest.fail("the interrupted run wrote no mid-epoch checkpoint in time")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (interrupted / "summary.json").exists()

    with safe_open(str(periodic[-1].parent / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["weights"] == "adapters-only" and metadata["base_model"] == "builtin:mlp"
    assert metadata["quantize_base"] == "int8" and len(metadata["base_fingerprint"]) == 64
    # adapters of the two int8 layers and the fully trained head; no frozen base weight
    assert keys and all("lora_" in key or "modules_to_save" in key for key in keys), keys
    assert not any(key.endswith("base_layer.weight") for key in keys)

    resumed = _start(tmp_path, interrupted, "resume")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    expected = load_file(str(uninterrupted / "checkpoints" / "last" / "model.safetensors"))
    actual = load_file(str(interrupted / "checkpoints" / "last" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    adapters = load_file(str(interrupted / "adapters" / "adapter_model.safetensors"))
    assert adapters.keys() == load_file(str(uninterrupted / "adapters" / "adapter_model.safetensors")).keys()
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == 12


def _fit(run_dir: Path, **changes) -> Trainer:
    config = CONFIG | {"run_dir": str(run_dir), "checkpoint": {}, "epochs": 1} | changes
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def test_adapters_only_checkpoint_refuses_another_base_and_merges_into_a_full_precision_one(tmp_path):
    from tightfit.runs.checkpoint import load_weights
    from tightfit.runs.model import load_lora_run

    trainer = _fit(tmp_path / "run", lora=CONFIG["lora"] | {"quantize_base": None})
    checkpoint = tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"
    base_bytes = sum(p.numel() * 4 for n, p in trainer.model.named_parameters() if not p.requires_grad)
    assert checkpoint.stat().st_size < base_bytes

    other = Trainer(
        CONFIG | {"run_dir": str(tmp_path / "other"), "seed": 4, "lora": CONFIG["lora"] | {"quantize_base": None}}
    )
    other.setup()
    with pytest.raises(TightfitError, match="differs from the one"):
        load_weights(other.model, checkpoint)

    inputs = torch.randn(5, 1, 8, 8)
    merged = load_lora_run(tmp_path / "run", merged=True)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs), trainer.model.eval()(inputs), atol=1e-5, rtol=1e-4)


def _nf4_resume_matches(tmp_path, device: str, backend: str) -> None:
    lora = CONFIG["lora"] | {"quantize_base": "nf4", "quant_backend": backend}
    settings = CONFIG | {"device": device, "lora": lora, "checkpoint": {"every_n_steps": 3}, "threads": None}

    class Crash(Exception):
        pass

    class CrashAtStep9:  # after ModelCheckpoint (an earlier callback) wrote "last" at step 9
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 9:
                raise Crash

    Trainer(settings | {"run_dir": str(tmp_path / "whole")}).fit()
    with pytest.raises(Crash):
        Trainer(settings | {"run_dir": str(tmp_path / "parts")}, callbacks=[CrashAtStep9()]).fit()
    Trainer(settings | {"run_dir": str(tmp_path / "parts")}).fit(resume_from=tmp_path / "parts")
    whole = load_file(str(tmp_path / "whole" / "checkpoints" / "last" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "checkpoints" / "last" / "model.safetensors"))
    assert whole.keys() == parts.keys() and all("lora_" in key or "modules_to_save" in key for key in whole)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "whole" / "checkpoints" / "last" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["quantize_base"] == "nf4"


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_nf4_lora_run_on_cpu_checkpoints_adapters_only_resumes_exactly_and_merges(tmp_path, backend):
    pytest.importorskip(backend)
    _nf4_resume_matches(tmp_path, "cpu", backend)
    from tightfit.runs.model import merge_run

    merged = merge_run(tmp_path / "whole")  # into a freshly built full-precision base
    assert merged["kind"] == "state_dict" and "model.safetensors" in merged["files"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_lora_run_on_cuda_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    _nf4_resume_matches(tmp_path, "cuda", "bitsandbytes")
