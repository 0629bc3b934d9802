"""tightfit generate: KV-cache decoding equals recomputation, sampling is seeded, a LoRA run on an
int8 base generates and merges into a folder plain transformers loads, bad targets exit 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from tightfit.cli import main  # noqa: E402
from tightfit.configs import config_dir  # noqa: E402
from tightfit.models.generate import generate_text, generate_token_ids, next_token  # noqa: E402
from tightfit.runs.model import load_for_generation  # noqa: E402

TINY_LLAMA = str(config_dir("tiny-llama"))


def test_kv_cache_decoding_gives_the_tokens_of_full_recomputation():
    loaded = load_for_generation(TINY_LLAMA)  # config only: random weights
    torch.manual_seed(0)
    prompt = loaded.tokenizer("What colour is the sky?")["input_ids"]
    cached, _ = generate_token_ids(loaded.model, prompt, max_new_tokens=12, use_cache=True)
    recomputed, _ = generate_token_ids(loaded.model, prompt, max_new_tokens=12, use_cache=False)
    assert cached == recomputed and len(cached) == 12


def test_sampling_is_greedy_at_zero_seeded_otherwise_and_top_p_keeps_the_head():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, 0.0, 1.0, torch.Generator()) == 1
    draws = [next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert set(draws) >= {1, 2} and draws == [
        next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)
    ]
    # top_p 0.5: token 1 alone carries more than half the mass, so only it remains
    assert {next_token(logits, 1.0, 0.5, torch.Generator().manual_seed(seed)) for seed in range(40)} == {1}


@pytest.fixture(scope="module")
def pirate_run(tmp_path_factory) -> Path:
    pytest.importorskip("torchao")
    import shutil

    from tightfit.models.spec import build_model
    from tightfit.training.trainer import Trainer

    root = tmp_path_factory.mktemp("generate")
    base = root / "tiny-llama"  # a model folder with weights, as a user's would be
    torch.manual_seed(0)
    model = build_model(f"hf:{TINY_LLAMA}")
    model.config.use_cache = True  # as downloaded model folders have it
    model.save_pretrained(str(base))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TINY_LLAMA) / name, base / name)
    run_dir = root / "pirate"
    config = {
        "model": f"hf:{base}",
        "data": {
            "source": "text-corpus",
            "path": "packaged:pirate-replies",
            "tokenizer": str(base),
            "max_length": 64,
            "val_fraction": 0.0,
            "test_fraction": 0.0,
            "limit": 16,
        },
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"], "quantize_base": "int8"},
        "optimizer": {"lr": 0.01},
        "batch": {"micro_batch_size": 8},
        "epochs": 1,
        "max_steps": 2,
        "device": "cpu",
        "precision": "fp32",
        "run_dir": str(run_dir),
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False},
    }
    Trainer(config).fit()
    return run_dir


def test_lora_run_on_an_int8_base_generates_streamed_text(pirate_run, capsys):
    from safetensors import safe_open

    with safe_open(str(pirate_run / "checkpoints" / "last" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["weights"] == "adapters-only"
        assert all("lora_" in key for key in handle.keys())
    assert main(["generate", str(pirate_run), "--prompt", "What colour is grass?", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr()
    assert "6 tokens" in streamed.err or "stopped: eos" in streamed.err
    assert (
        main(["generate", str(pirate_run), "--prompt", "What colour is grass?", "--max-new-tokens", "6", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] >= 1 and result["settings"]["kv_cache"] is True
    assert streamed.out.strip() == result["text"].strip()  # the streamed pieces add up to the text
    assert result["prompt_tokens"] > 10  # rendered with the plain conversation template


def test_merged_lora_run_loads_with_plain_transformers(pirate_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tightfit.runs.model import load_lora_run

    output = tmp_path / "merged"
    assert main(["lora", "merge", str(pirate_run), "--output", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "transformers"
    plain = AutoModelForCausalLM.from_pretrained(str(output), local_files_only=True).eval()
    inputs = torch.tensor([[1, 261, 277, 28, 201]])
    with torch.no_grad():
        torch.testing.assert_close(
            plain(inputs).logits, load_lora_run(pirate_run, merged=True)(inputs).logits, atol=1e-5, rtol=1e-4
        )


def test_a_merged_folder_is_what_transformers_pipeline_takes_and_it_can_move(pirate_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    output = tmp_path / "merged"
    assert main(["lora", "merge", str(pirate_run), "--output", str(output), "--json"]) == 0
    capsys.readouterr()
    assert (output / "tokenizer.json").is_file() and (output / "generation_config.json").is_file()
    moved = tmp_path / "elsewhere" / "merged"
    moved.parent.mkdir()
    shutil.move(output, moved)
    tokenizer = AutoTokenizer.from_pretrained(str(moved), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(moved), local_files_only=True)
    assert tokenizer("What colour is grass?")["input_ids"]
    generated = pipeline("text-generation", model=str(moved), max_new_tokens=3, do_sample=False)(
        "What colour is grass?"
    )
    assert generated[0]["generated_text"].startswith("What colour is grass?")
    assert main(["generate", str(moved), "--prompt", "What colour is grass?", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1
    assert model.config.use_cache is True


def test_generate_refuses_what_is_not_a_language_model(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: builtin:digits-cnn\n")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi"]) == 2
    assert "not a language model" in capsys.readouterr().err
    classifier = tmp_path / "bert"
    classifier.mkdir()
    (classifier / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BertForSequenceClassification"],
                "model_type": "bert",
                "vocab_size": 64,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
            }
        )
    )
    assert main(["generate", str(classifier), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert (
        "BertForSequenceClassification is not a causal language model" in error and len(error.strip().splitlines()) == 1
    )
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2


def test_lora_on_a_weightless_config_folder_says_what_is_missing(tmp_path, capsys):
    code = main(
        ["train", "recipes/qlora-7b.yaml", "data.tokenizer=packaged:tiny-llama", "--run-dir", str(tmp_path / "run")]
    )
    error = capsys.readouterr().err
    assert code == 2 and "no weights" in error and "llama-7b" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_generate_text_rejects_bad_settings():
    loaded = load_for_generation(TINY_LLAMA)
    with pytest.raises(Exception, match="top_p"):
        generate_text(loaded, "hi", top_p=0.0)


def test_training_turns_the_kv_cache_off_and_the_merged_model_has_it_on(pirate_run, tmp_path):
    from tightfit.config import load_config
    from tightfit.training.trainer import Trainer

    config = load_config(pirate_run / "config.yaml", [f"run_dir={tmp_path / 'again'}"])
    trainer = Trainer(config)
    trainer.setup()
    assert trainer.model.get_base_model().config.use_cache is False
    main(["lora", "merge", str(pirate_run), "--output", str(tmp_path / "merged"), "--json"])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["use_cache"] is True
