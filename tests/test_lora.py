"""LoRA through PEFT: targets, frozen base, training, save → load → merge, meta models, bad input."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from tightfit.errors import ConfigError, TightfitError  # noqa: E402
from tightfit.models.lora import (  # noqa: E402
    LoRAConfig,
    apply_lora,
    count_parameters,
    find_lora_targets,
    find_task_heads,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from tightfit.step.step import TrainingStep  # noqa: E402


class TinyAttentionClassifier(nn.Module):
    """Embedding → one attention block (q/k/v/o) → MLP → mean pool → head."""

    def __init__(self, vocab=50, width=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.ModuleDict({name: nn.Linear(width, width) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        q, k, v = self.attn["q_proj"](x), self.attn["k_proj"](x), self.attn["v_proj"](x)
        x = x + self.attn["o_proj"](torch.softmax(q @ k.transpose(1, 2) / 4, dim=-1) @ v)
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1))


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_auto_targets_by_model_type():
    torch.manual_seed(0)
    # attention projections when the model has attention modules; the head stays out of LoRA
    model = TinyAttentionClassifier()
    assert find_task_heads(model) == ["head"]
    assert find_lora_targets(model) == [f"attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    # a plain MLP: every Linear but the head
    assert find_lora_targets(_mlp()) == ["0", "2"]
    # a Hugging Face BERT: query/key/value and the attention output, not the feed-forward
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    bert = transformers.BertForSequenceClassification(config)
    targets = find_lora_targets(bert)
    leaves = {name.split(".", 4)[-1] for name in targets}
    assert leaves == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    assert len(targets) == 8
    assert find_task_heads(bert) == ["classifier"]


def test_only_adapters_and_head_train_and_loss_goes_down():
    torch.manual_seed(0)
    base = TinyAttentionClassifier()
    frozen_before = {name: p.detach().clone() for name, p in base.named_parameters() if not name.startswith("head")}
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8), verbose=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".head." in name for name in trainable)
    assert any("lora_A" in name for name in trainable) and any("modules_to_save" in name for name in trainable)
    summary = model.lora_summary
    assert (summary.trainable_parameters, summary.total_parameters) == count_parameters(model)
    # 4 projections of 16x16 with rank 4: (16*4 + 4*16) each, plus the head (16*3 + 3)
    assert summary.trainable_parameters == 4 * 128 + 51

    tokens = torch.randint(0, 50, (32, 6))
    target = tokens[:, 0] % 3  # learnable from the first token
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    step = TrainingStep(model, optimizer, micro_batch_size=32)
    losses = [float(step((tokens, target)).loss) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    for name, parameter in model.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in frozen_before:
            assert torch.equal(parameter, frozen_before[clean]), f"{name} changed"


def test_summary_is_printed(capsys):
    apply_lora(_mlp(), LoRAConfig(rank=2))
    line = capsys.readouterr().out
    assert "LoRA rank 2" in line and "trainable of" in line and "parameters" in line


def test_save_load_merge_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(TinyAttentionClassifier(), LoRAConfig(rank=4), verbose=False)
    # LoRA B starts at zero; make the adapters non-trivial so the test can fail
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.eval()
    tokens = torch.randint(0, 50, (5, 7))
    expected = model(tokens)

    directory = save_adapters(model, tmp_path / "adapters")
    assert (directory / "adapter_model.safetensors").is_file()
    saved = json.loads((directory / "tightfit_lora.json").read_text())
    assert saved["lora"]["rank"] == 4 and saved["summary"]["trainable_parameters"] > 0

    torch.manual_seed(0)
    reloaded = load_adapters(TinyAttentionClassifier(), directory)
    torch.testing.assert_close(reloaded(tokens), expected)
    merged = merge_adapters(reloaded)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert isinstance(merged, TinyAttentionClassifier)
    torch.testing.assert_close(merged(tokens), expected, atol=1e-5, rtol=1e-4)
    # and the adapters really changed the model: a plain base gives other outputs
    torch.manual_seed(0)
    assert not torch.allclose(TinyAttentionClassifier()(tokens), expected, atol=1e-3)


def test_meta_model_gets_adapters_without_storage():
    with torch.device("meta"):
        model = TinyAttentionClassifier(vocab=1000, width=256)
    wrapped = apply_lora(model, LoRAConfig(rank=8), verbose=False)
    assert all(parameter.is_meta for parameter in wrapped.parameters())
    assert wrapped.lora_summary.trainable_parameters == 4 * 2 * 8 * 256 + 256 * 3 + 3


def test_explicit_targets_and_unknown_names():
    model = apply_lora(_mlp(), LoRAConfig(rank=2, target_modules=["2"], modules_to_save=[]), verbose=False)
    assert model.lora_summary.target_modules == ["2"]
    assert model.lora_summary.modules_to_save == []
    with pytest.raises(ConfigError, match=r"no module named 'q_prj'.*closest: q_proj"):
        apply_lora(TinyAttentionClassifier(), LoRAConfig(target_modules=["q_prj"]), verbose=False)
    with pytest.raises(TightfitError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(), verbose=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, r"lora\.rank"),
        ({"dropout": 1.5}, r"lora\.dropout"),
        ({"target_modules": []}, r"lora\.target_modules"),
        ({"bias": "some"}, r"lora\.bias"),
        ({"quantize_base": "nf3"}, r"lora\.quantize_base"),
        ({"rnak": 8}, r"lora\.rnak"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        apply_lora(_mlp(), settings, verbose=False)


def test_merge_and_load_need_adapters(tmp_path):
    with pytest.raises(TightfitError, match="no LoRA adapters"):
        merge_adapters(_mlp())
    with pytest.raises(TightfitError, match="adapter_config.json is missing"):
        load_adapters(_mlp(), tmp_path)
