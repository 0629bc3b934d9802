"""QLoRA: an NF4 base on CPU through both backends, offline; a quantization that cannot run is an error."""

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from tightfit.errors import ConfigError  # noqa: E402
from tightfit.models.lora import LoRAConfig, apply_lora  # noqa: E402
from tightfit.models.qlora import (  # noqa: E402
    quantized_base_bytes,
    quantized_weight_bytes,
    resolve_quantize_base,
)
from tightfit.step.loss import forward_and_loss  # noqa: E402


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_nf4_is_resolved_for_the_device_never_swapped():
    for device_type in ("cpu", "mps", "cuda"):
        chosen = resolve_quantize_base("nf4", device_type, check_installed=False)
        assert chosen.method == "nf4" and chosen.backend in ("bitsandbytes", "torchao") and chosen.reason
    assert resolve_quantize_base("nf4", "cpu", "torchao", check_installed=False).backend == "torchao"
    assert resolve_quantize_base(None, "cpu").method is None
    assert resolve_quantize_base("int8", "cpu").backend == "torchao"
    with pytest.raises(ConfigError, match="nf4, int8"):
        resolve_quantize_base("fp4", "cuda")
    with pytest.raises(ConfigError, match="int8 bases are quantized by torchao"):
        resolve_quantize_base("int8", "cpu", "bitsandbytes")


def test_a_quantization_that_cannot_run_is_an_error_naming_what_would(monkeypatch):
    import tightfit.models.nf4 as nf4
    import tightfit.models.qlora as qlora

    installed = {"torchao"}  # bitsandbytes missing here
    monkeypatch.setattr(nf4, "is_available", lambda name: name in installed)
    monkeypatch.setattr(qlora, "is_available", lambda name: name in installed)
    with pytest.raises(ConfigError, match=r"bitsandbytes, which is not installed; use lora.quant_backend: torchao"):
        resolve_quantize_base("nf4", "cpu", "bitsandbytes")
    # auto takes the backend that is installed, and says why; still nf4, not int8
    chosen = resolve_quantize_base("nf4", "cuda")
    assert (chosen.method, chosen.backend) == ("nf4", "torchao") and "not installed" in chosen.reason
    installed.clear()
    with pytest.raises(ConfigError, match=r"int8 needs torchao.*quantize_base: nf4"):
        resolve_quantize_base("int8", "cpu")
    with pytest.raises(ConfigError, match="not installed"):
        resolve_quantize_base("nf4", "cpu")


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_nf4_base_trains_on_cpu(backend, capsys):
    pytest.importorskip(backend)
    model = apply_lora(_model(), LoRAConfig(rank=4, quantize_base="nf4", quant_backend=backend), device="cpu")
    printed = capsys.readouterr()
    assert f"nf4 through {backend}" in printed.out and "kernels-community" not in printed.out + printed.err
    assert model.lora_summary.quantize_base == "nf4" and model.lora_summary.quant_backend == backend
    base_layer = model.get_base_model()[2].base_layer
    packed = base_layer.weight
    # really 4-bit: bitsandbytes packs two weights a byte; torchao's NF4Tensor holds uint8 codes
    inner = packed.quantized_data if backend == "torchao" else packed
    assert inner.dtype == torch.uint8 and inner.numel() == 64 * 64 // 2
    assert model.get_base_model()[4].weight.dtype == torch.float32  # the head stays full precision

    inputs = torch.randn(64, 32)
    target = (inputs[:, 0] > 0).long() + 2 * (inputs[:, 1] > 0).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(30):
        _, loss = forward_and_loss(model, (inputs, target))
        loss.backward()
        first_adapter = model.get_base_model()[0].lora_B["default"].weight
        assert first_adapter.grad is not None and first_adapter.grad.abs().sum() > 0  # through the NF4 layers
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 10:  # an evaluation pass between steps leaves the base trainable
            model.eval()
            with torch.no_grad():
                model(inputs)
            model.train()
    assert losses[-1] < 0.7 * losses[0]


def test_bitsandbytes_is_imported_offline_and_quietly():
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    script = (
        "import logging, sys; logging.basicConfig(level=logging.DEBUG)\n"
        "import socket\n"
        "def refuse(*args, **kwargs): raise AssertionError('network touched')\n"
        "socket.socket.connect = refuse\n"
        "from torch import nn\n"
        "from tightfit.models.lora import LoRAConfig, apply_lora\n"
        "model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))\n"
        "apply_lora(model, LoRAConfig(rank=2, target_modules=['0']), verbose=False)  # PEFT imports bitsandbytes\n"
        "assert 'bitsandbytes' in sys.modules\n"
        "assert 'kernels' not in sys.modules or sys.modules['kernels'] is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stdout + done.stderr and "trust_remote_code" not in done.stderr


def test_quantized_byte_counts():
    # NF4: half a byte a weight + one 8-bit absmax per 64 weights + one fp32 per 256 absmax
    assert quantized_weight_bytes(4096 * 4096, 4096, "nf4") == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (
        4096 * 4096 // 64 // 256
    )
    assert quantized_weight_bytes(4096 * 4096, 4096, "int8", dtype_bytes=2) == 4096 * 4096 + 2 * 4096
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 10))
    original, quantized = quantized_base_bytes(model, "nf4", skip=["1"])
    assert original == 1024 * 1024 * 4  # the head is skipped
    assert 0.5 * 1024 * 1024 < quantized < 0.54 * 1024 * 1024


def test_meta_model_with_quantized_base_is_counted_not_built():
    with torch.device("meta"):
        model = _model()
    wrapped = apply_lora(model, LoRAConfig(rank=4, quantize_base="int8"), verbose=False)
    assert all(parameter.is_meta for parameter in wrapped.parameters())
    assert any("planner" in note for note in wrapped.lora_summary.notes)


@pytest.mark.gpu
@pytest.mark.gpu
def test_nf4_base_on_cuda_trains():
    pytest.importorskip("bitsandbytes")
    model = apply_lora(_model(), LoRAConfig(rank=4, quantize_base="nf4"), device="cuda", verbose=False)
    assert model.lora_summary.quantize_base == "nf4"
    model = model.cuda()
    inputs = torch.randn(16, 32, device="cuda")
    target = torch.randint(0, 4, (16,), device="cuda")
    _, loss = forward_and_loss(model, (inputs, target))
    loss.backward()
    assert model.get_base_model()[0].lora_A["default"].weight.grad is not None
