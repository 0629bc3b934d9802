"""The text-corpus source: rendering, response-only labels, packing, truncation, cache, bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tightfit.cli import main  # noqa: E402
from tightfit.configs import config_dir  # noqa: E402
from tightfit.data.build import build_datasets  # noqa: E402
from tightfit.data.lm_corpus import IGNORE_INDEX, length_histogram, pack_documents  # noqa: E402
from tightfit.data.text import load_tokenizer  # noqa: E402

TOKENIZER = str(config_dir("tiny-llama"))


def _build(path, **settings):
    config = {
        "source": "text-corpus",
        "path": str(path),
        "tokenizer": TOKENIZER,
        "val_fraction": 0.0,
        "test_fraction": 0.0,
    } | settings
    return build_datasets(config, seed=0)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def test_prompt_response_trains_on_the_response_and_its_eos_only(tmp_path):
    tokenizer = load_tokenizer(Path(TOKENIZER))
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "What colour is snow?", "response": "Snow is white."}])
    sample = _build(corpus, packing=False).train[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert labels == [token if label != IGNORE_INDEX else IGNORE_INDEX for token, label in zip(ids, labels)]
    assert trained[-1] == tokenizer.eos_token_id and tokenizer.decode(trained[:-1]) == "Snow is white."
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]).startswith("### User:\nWhat colour is snow?\n### Assistant:\n")


def test_messages_use_the_chat_template_and_train_on_assistant_turns_only(tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt "
        "%}<assistant>{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Farewell."},
    ]
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    bundle = build_datasets(
        {"source": "text-corpus", "path": str(corpus), "tokenizer": str(folder), "val_fraction": 0, "test_fraction": 0},
        seed=0,
    )
    assert bundle.metadata["template"] == "chat template"
    sample = bundle.train[0]
    tokenizer = load_tokenizer(folder)
    trained = [
        token for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == "Hello.</s>Farewell.</s>"
    assert tokenizer.decode(sample["input_ids"].tolist()).startswith(
        "<system>Be brief.</s><user>Hi</s><assistant>Hello."
    )


def test_text_files_pack_whole_documents_and_never_predict_across_a_boundary(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four five.\n\nsix seven.\n\n" + "eight nine ten. " * 3)
    (tmp_path / "b.txt").write_text("eleven twelve.\n")
    bundle = _build(tmp_path, max_length=24)
    assert bundle.metadata["documents"] == 4 and bundle.metadata["tokens"] == bundle.metadata["trained_tokens"]
    tokenizer = load_tokenizer(Path(TOKENIZER))
    rows = [bundle.train[index] for index in range(len(bundle.train))]
    assert all(len(row["input_ids"]) <= 24 for row in rows)
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        starts = (ids == tokenizer.bos_token_id).nonzero().flatten().tolist()
        assert starts[0] == 0  # every row begins with a whole document
        assert all(labels[start] == IGNORE_INDEX for start in starts)
    text = " ".join(tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in rows)
    assert "six seven." in text and "eleven twelve." in text
    assert len(rows) < 4  # something was packed together


def test_overlong_documents_are_truncated_or_dropped_and_counted(tmp_path):
    corpus = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "Hi", "response": "Short."},
            {"prompt": "Tell me", "response": "word " * 60},
        ],
    )
    truncated = _build(corpus, max_length=32, packing=False)
    assert truncated.metadata["overlong"] == {"documents": 1, "action": "truncated"}
    assert max(len(truncated.train[i]["input_ids"]) for i in range(len(truncated.train))) == 32
    assert "1 longer than max_length 32 (truncated)" in truncated.metadata["summary"]
    dropped = _build(corpus, max_length=32, overlong="drop")
    assert dropped.metadata["overlong"]["action"] == "dropped" and len(dropped.train) == 1
    assert "(dropped)" in dropped.metadata["summary"]


def test_histogram_and_packing_units():
    assert length_histogram([3, 20, 40, 300], 128) == {"1-16": 1, "17-32": 1, "33-64": 1, "65-128": 0, ">128": 1}
    documents = [
        (torch.arange(5), torch.arange(5)),
        (torch.arange(4), torch.arange(4)),
        (torch.arange(3), torch.arange(3)),
    ]
    rows = pack_documents(documents, max_length=8, packing=True)
    assert [len(ids) for ids, _ in rows] == [5, 7]
    assert rows[1][1].tolist() == [IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, 1, 2]


def test_tokenisation_goes_through_the_data_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _build("packaged:pirate-replies", cache=str(cache))
    second = _build("packaged:pirate-replies", cache=str(cache))
    assert not first.metadata["cache_hit"] and second.metadata["cache_hit"]
    assert torch.equal(first.train[0]["input_ids"], second.train[0]["input_ids"])
    assert torch.equal(first.train[0]["labels"], second.train[0]["labels"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ('{"prompt": "a", "response": "b"}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "line 1: the record has no 'response'"),
    ],
)
def test_bad_corpus_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(content)
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "model=builtin:tiny-gpt",
            "data.source=text-corpus",
            f"data.path={corpus}",
            f"data.tokenizer={TOKENIZER}",
            "--run-dir",
            str(run_dir),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_missing_tokenizer_and_non_causal_model_are_one_line_errors(tmp_path, capsys):
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}])
    code = main(
        [
            "train",
            "model=builtin:tiny-gpt",
            "data.source=text-corpus",
            f"data.path={corpus}",
            f"data.tokenizer={tmp_path / 'nope'}",
            "--run-dir",
            str(tmp_path / "r1"),
        ]
    )
    assert code == 2 and "data.tokenizer: no such folder" in capsys.readouterr().err
    code = main(
        [
            "train",
            "model=builtin:tiny-bert",
            "data.source=text-corpus",
            f"data.path={corpus}",
            f"data.tokenizer={TOKENIZER}",
            "data.val_fraction=0",
            "data.test_fraction=0",
            "--run-dir",
            str(tmp_path / "r2"),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and "TinyBERT is not a causal language model" in error
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_a_generation_prompt_is_tokenised_exactly_as_the_training_conversations_were():
    from tightfit.data.lm_corpus import render_prompt, tokenize_document

    tokenizer = load_tokenizer(Path(TOKENIZER))
    prompt = render_prompt(tokenizer, "What colour is grass?")
    ids, trained = tokenize_document(
        tokenizer,
        [{"role": "user", "content": "What colour is grass?"}, {"role": "assistant", "content": "Grass is green."}],
    )
    assert ids[: len(prompt)] == prompt and not any(trained[: len(prompt)]) and trained[len(prompt)]
