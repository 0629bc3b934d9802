"""Activation checkpointing: which blocks, same numbers, less memory, clear errors."""

import copy
import json

import pytest
import torch
from torch import nn

from tightfit.errors import ConfigError
from tightfit.models.checkpointing import apply_activation_checkpointing, find_repeated_blocks
from tightfit.models.spec import build_model, make_batch_factory, parse_input_spec
from tightfit.step.loss import forward_and_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core CI machine: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_finds_resnet_stage_blocks():
    blocks = find_repeated_blocks(build_model("torchvision:resnet18", meta=True))
    assert blocks == [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]


def test_finds_transformer_layers():
    assert find_repeated_blocks(build_model("builtin:tiny-gpt", depth=3)) == ["blocks.0", "blocks.1", "blocks.2"]
    vit = find_repeated_blocks(build_model("torchvision:vit_b_16", meta=True))
    assert vit == [f"encoder.layers.encoder_layer_{index}" for index in range(12)]


def test_finds_hf_layers(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BertForSequenceClassification"],
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "vocab_size": 50,
            }
        )
    )
    model = build_model(f"hf:{tmp_path}", meta=True)
    assert find_repeated_blocks(model) == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]


def test_no_repeated_blocks():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # leaves repeat, but they are not blocks
    assert find_repeated_blocks(model) == []
    assert apply_activation_checkpointing(model) == []


def _loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    _, loss = forward_and_loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "spec, input_spec, kwargs",
    [
        ("builtin:tiny-gpt", "tokens:32", {"dim": 32, "depth": 3, "heads": 2, "vocab_size": 64}),
        ("torchvision:resnet18", "3x16x16", {"num_classes": 5}),
    ],
)
def test_same_loss_and_gradients(spec, input_spec, kwargs):
    torch.manual_seed(0)
    model = build_model(spec, **kwargs)
    checkpointed = copy.deepcopy(model)
    names = apply_activation_checkpointing(checkpointed)
    assert names and all(type(dict(checkpointed.named_modules())[n]).__name__.startswith("Checkpointed") for n in names)
    batch = make_batch_factory(parse_input_spec(input_spec), model)(4, "cpu")
    loss, gradients = _loss_and_gradients(model, batch)
    loss_ckpt, gradients_ckpt = _loss_and_gradients(checkpointed, batch)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_ckpt[name], gradient, rtol=1e-5, atol=1e-6)


def test_state_dict_deepcopy_and_idempotence():
    model = build_model("builtin:tiny-gpt", dim=32, depth=2, heads=2)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model)
    assert list(model.state_dict()) == keys
    again = apply_activation_checkpointing(model)  # applying twice wraps nothing twice
    assert again == ["blocks.0", "blocks.1"]
    assert [cls.__name__ for cls in type(model.blocks[0]).__bases__] == ["_CheckpointedForward", "TransformerBlock"]
    clone = copy.deepcopy(model)
    assert type(clone.blocks[0]) is type(model.blocks[0]) and clone.blocks[0] is not model.blocks[0]
    with torch.no_grad():  # evaluation runs the plain forward
        clone.eval()
        assert clone(torch.randint(0, 100, (1, 8))).logits.shape == (1, 8, 1024)


def test_unknown_name_suggests_the_closest():
    model = build_model("builtin:tiny-gpt", dim=32, depth=2, heads=2)
    with pytest.raises(ConfigError, match=r"no module named 'block.1'; did you mean 'blocks.1'"):
        apply_activation_checkpointing(model, ["block.1"])
    with pytest.raises(ConfigError, match="expected 'auto' or a list"):
        apply_activation_checkpointing(model, "all")


def test_lower_measured_peak():
    """Real tensors, the memory engine's tracker: checkpointing must lower the step's peak."""
    from tightfit.memory.measure import measure_step

    def factory():
        torch.manual_seed(0)
        return build_model("builtin:tiny-gpt", dim=64, depth=4, heads=2, vocab_size=128, max_length=128)

    batch_factory = make_batch_factory(parse_input_spec("tokens:128"), factory())
    plain = measure_step(factory, batch_factory, batch_size=8, device="cpu")
    checkpointed = measure_step(factory, batch_factory, batch_size=8, device="cpu", checkpointing=True)
    assert checkpointed.breakdown["activations"] < 0.8 * plain.breakdown["activations"]
    assert checkpointed.peak_bytes < plain.peak_bytes
    assert checkpointed.breakdown["parameters"] == plain.breakdown["parameters"]


def test_checkpointing_turns_off_the_kv_cache_of_transformers_models():
    # A recomputed attention block would append its keys and values to the cache a second time.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    assert model.config.use_cache is True
    assert apply_activation_checkpointing(model) == ["model.layers.0", "model.layers.1"]
    assert model.config.use_cache is False


def test_a_unet_checkpoints_its_resnet_and_attention_blocks_but_not_their_containers():
    # The SD 1.5 UNet shipped for planning, built on meta: its ResNet blocks hold the most weights,
    # its attention transformers half as many; the CrossAttn down/up blocks enclose both.
    pytest.importorskip("diffusers")
    from pathlib import Path

    import tightfit

    unet = build_model(f"diffusion:{Path(tightfit.__file__).parent / 'configs' / 'sd15-unet'}", meta=True)
    blocks = find_repeated_blocks(unet)
    kinds = {type(unet.get_submodule(name)).__name__ for name in blocks}
    assert kinds == {"ResnetBlock2D", "Transformer2DModel"}
    assert not any(inner.startswith(outer + ".") for inner in blocks for outer in blocks)
