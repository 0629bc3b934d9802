"""QLoRA: the NF4 base where bitsandbytes and CUDA are, the clear message and int8 fallback elsewhere."""

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


def test_nf4_without_cuda_says_why_and_what_instead():
    choice, reason = resolve_quantize_base("nf4", "cpu")
    assert choice == "int8"
    assert "CUDA" in reason and "on cpu" in reason and "int8" in reason and "torchao" in reason
    assert "\n" not in reason
    choice, reason = resolve_quantize_base("nf4", "mps")
    assert choice == "int8" and "on mps" in reason
    assert resolve_quantize_base(None, "cpu") == (None, "")
    assert resolve_quantize_base("int8", "cpu") == ("int8", "")
    with pytest.raises(ConfigError, match="nf4, int8"):
        resolve_quantize_base("fp4", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_nf4_request_on_cpu_trains_an_int8_base(capsys):
    pytest.importorskip("torchao")
    model = apply_lora(_model(), LoRAConfig(rank=4, quantize_base="nf4"))
    printed = capsys.readouterr().out
    assert "QLoRA nf4 is not available" in printed and "int8" in printed
    assert model.lora_summary.quantize_base == "int8"
    assert model.lora_summary.notes and "CUDA" in model.lora_summary.notes[0]
    base_weight = model.get_base_model()[2].base_layer.weight
    assert "Int8" in type(base_weight).__name__  # really quantized, not just labelled
    assert model.get_base_model()[4].weight.dtype == torch.float32  # the head stays full precision

    inputs = torch.randn(64, 32)
    target = (inputs[:, 0] > 0).long() + 2 * (inputs[:, 1] > 0).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = forward_and_loss(model, (inputs, target))
        loss.backward()
        # lora_B of the first layer gets a gradient only through the int8 layers above it
        # (lora_A's is zero until B moves away from its zero init)
        first_adapter = model.get_base_model()[0].lora_B["default"].weight
        assert first_adapter.grad is not None and first_adapter.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


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
