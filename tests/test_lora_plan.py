"""Planning LoRA/QLoRA on the 7B decoder config without allocating its weights."""

import gc
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from tightfit.memory.overhead import device_overhead  # noqa: E402
from tightfit.models.lora import LoRAConfig, apply_lora  # noqa: E402
from tightfit.models.qlora import quantizable_linears, with_quantized_base  # noqa: E402
from tightfit.models.spec import build_model  # noqa: E402

LLAMA_7B = "hf:" + str(Path(__file__).resolve().parents[1] / "src" / "tightfit" / "configs" / "llama-7b")


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_7b_lora_on_meta_allocates_no_weights():
    before = _rss()
    base = build_model(LLAMA_7B, meta=True)
    model = apply_lora(base, LoRAConfig(rank=16), verbose=False)
    grown = _rss() - before
    summary = model.lora_summary
    assert 6.7e9 < summary.total_parameters < 6.8e9
    # q/k/v/o in 32 layers, rank 16: 32 * 4 * 16 * (4096 + 4096)
    assert summary.trainable_parameters == 32 * 4 * 16 * 8192
    assert all(parameter.is_meta for parameter in model.parameters())
    assert grown < 300 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB (the weights alone would be 25 GiB)"


def test_quantized_base_adjustment_on_the_7b_config():
    from tightfit.hardware.profiles import get_profile

    base = build_model(LLAMA_7B, meta=True)
    names = quantizable_linears(base)
    assert len(names) == 32 * 7 and "lm_head" not in names  # q,k,v,o,gate,up,down; lm_head stays 16-bit
    linear_weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    breakdown = {"parameters": 2 * 6_738_415_616, "gradients": 0, "optimizer": 0, "activations": 10**9, "overhead": 0}
    profile = get_profile("rtx3050-laptop-6gb")
    adjusted, notes = with_quantized_base(
        breakdown, base, "nf4", overhead=lambda peak: device_overhead(profile, tensor_peak_bytes=peak).total_bytes
    )
    saved = breakdown["parameters"] - adjusted["parameters"]
    # 16 bits -> ~4.13 bits per linear weight (NF4 + double-quantized constants)
    assert 0.73 * 2 * linear_weights < saved < 0.75 * 2 * linear_weights
    assert adjusted["activations"] == 10**9 + 2 * 4096 * 11008  # one dequantized MLP weight
    assert adjusted["overhead"] > 0 and "nf4 base" in notes[0]


def test_planner_plans_a_lora_decoder_on_fake_tensors():
    from tightfit.hardware.profiles import get_profile
    from tightfit.plan.planner import plan

    before = _rss()
    # the 7B architecture at 2 layers keeps the test fast; the estimate runs the real step on fake tensors
    result = plan(
        LLAMA_7B,
        "tokens:64",
        batch_size=1,
        precision="bf16-pure",
        checkpointing=False,
        lora_rank=8,
        profile=get_profile("a100-40gb"),
        model_kwargs={"num_hidden_layers": 2},
    ).to_dict()
    assert _rss() - before < 500 * 2**20
    parameters = result["parameters"]
    assert result["trainable_parameters"] == 2 * 4 * 8 * 8192
    # a frozen bf16 base: parameters ~2 bytes each; gradients and AdamW state only for the adapters
    assert 1.9 * parameters < result["breakdown"]["parameters"] < 2.1 * parameters
    assert result["breakdown"]["optimizer"] <= 2 * 2 * result["trainable_parameters"] * 1.01
    assert result["verdict"] == "fits"
    torch.testing.assert_close(float(sum(result["breakdown"].values())), float(result["peak_bytes"]))


def test_planner_quantized_base_option():
    from tightfit.errors import ConfigError
    from tightfit.hardware.profiles import get_profile
    from tightfit.plan.planner import plan

    settings = dict(
        batch_size=1,
        precision="bf16-pure",
        checkpointing=False,
        lora_rank=8,
        profile=get_profile("rtx3050-laptop-6gb"),
        model_kwargs={"num_hidden_layers": 2},
    )
    bf16 = plan(LLAMA_7B, "tokens:64", **settings).to_dict()
    nf4 = plan(LLAMA_7B, "tokens:64", quantize_base="nf4", **settings).to_dict()
    linear_weights = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    saved = bf16["breakdown"]["parameters"] - nf4["breakdown"]["parameters"]
    assert 0.73 * 2 * linear_weights < saved < 0.75 * 2 * linear_weights
    assert nf4["peak_bytes"] == sum(nf4["breakdown"].values()) < bf16["peak_bytes"]
    assert any("nf4 base" in note for note in nf4["notes"])
    with pytest.raises(ConfigError, match="needs a LoRA rank"):
        plan(LLAMA_7B, "tokens:64", quantize_base="nf4", batch_size=1, model_kwargs={"num_hidden_layers": 1})
