"""Text corpora for causal language models: JSONL conversations and plain ``.txt`` files.

``data: {source: text-corpus, path: FILE_OR_FOLDER, tokenizer: MODEL_DIR, max_length: 256}``
reads

* ``.jsonl`` files, one record a line: ``{"prompt": ..., "response": ...}`` or
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``;
* ``.txt`` files: documents separated by a blank line;
* a folder: every ``.jsonl`` and ``.txt`` file in it, sorted by name.

A conversation is rendered with the tokenizer's chat template when it has one, otherwise with
the plain template (:data:`PLAIN_ROLE_HEADER`)::

    <bos>### User:
    What colour is the sky?
    ### Assistant:
    The sky is blue.<eos>

The loss is on the assistant's tokens only (and its end-of-sequence token, which teaches the
model to stop): every other position is labelled -100, which transformers' causal-LM loss
ignores. A ``.txt`` document is trained on in full.

Documents are tokenised once (through the data cache when ``cache`` is on), split into
train/val/test by document, then packed: whole documents are laid end to end into rows of at most
``max_length`` tokens, never split across two rows, and the first token of each document is
labelled -100 so no position learns to predict across a boundary. Attention inside a row still
sees the earlier documents of the row, as in transformers' ``packing=True`` recipes (each
document starts with its own ``<bos>``), and the rows are the same every epoch: on a small corpus
of short, similar conversations a model learns to lean on its row's earlier documents, and then
answers worse alone. ``packing: false`` keeps one document per row (what the shipped recipes use);
packing pays off on long ``.txt`` documents. A document
longer than ``max_length`` is cut (``overlong: truncate``, the default) or left out
(``overlong: drop``), and the summary says how many.

Samples are ``{"input_ids", "attention_mask", "labels"}``: the keyword arguments of a
transformers ``*ForCausalLM`` (and of ``builtin:tiny-gpt``), which compute their own loss.

Shipped corpora (``path: packaged:NAME``): ``replies`` (124 questions with plain one-sentence
answers), ``pirate-replies`` (62 of them answered in a pirate's voice), ``facts`` (the answers as
plain text).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tightfit.data.cache import TensorCache, describe, hash_file, resolve_cache_dir
from tightfit.data.config import DataConfig, DataError
from tightfit.data.splits import limit_indices, split_indices
from tightfit.data.text import PACKAGED_PREFIX, load_tokenizer, resolve_tokenizer_dir, tokenizer_fingerprint
from tightfit.errors import ConfigError
from tightfit.paths import local_path

IGNORE_INDEX = -100  # the label transformers' cross-entropy skips
DEFAULT_MAX_LENGTH = 256
SUFFIXES = (".jsonl", ".txt")
ROLES = ("system", "user", "assistant")
PLAIN_ROLE_HEADER = "### {role}:\n"
"""The plain template's header before each message (``### User:``); the message follows, then a
newline, or ``<eos>`` after an assistant message."""
PACKAGED_CORPORA = ("replies", "pirate-replies", "facts")  # packaged:NAME, in tightfit.paths.PACKAGED


# ---------------------------------------------------------------------------------- reading
def corpus_files(path: str | None) -> list[Path]:
    """The ``.jsonl``/``.txt`` files ``data.path`` names (a file, a folder, or ``packaged:NAME``).

    Raises:
        ConfigError: no path, an unknown packaged name, a missing file, another suffix, an empty folder.
    """
    if path is None:
        raise ConfigError(
            "data.path: the text-corpus source needs a .jsonl or .txt file or a folder of them "
            f"(or {PACKAGED_PREFIX}NAME, one of: {', '.join(PACKAGED_CORPORA)})"
        )
    try:
        resolved = local_path(path, "data.path", kinds=PACKAGED_CORPORA)
    except ValueError as error:
        raise ConfigError(str(error).replace("no packaged", "no packaged corpus")) from None
    if resolved.is_dir():
        files = sorted(item for item in resolved.rglob("*") if item.suffix in SUFFIXES and item.is_file())
        if not files:
            raise ConfigError(f"data.path: {resolved} holds no .jsonl or .txt files")
        return files
    if not resolved.is_file():
        raise ConfigError(f"data.path: no such file or folder {resolved}")
    if resolved.suffix not in SUFFIXES:
        raise ConfigError(f"data.path: {resolved.name} is neither .jsonl nor .txt (the text-corpus source reads those)")
    return [resolved]


def read_documents(path: Path) -> list[list[dict[str, str]] | str]:
    """The documents of one file: a list of messages per JSONL record, a string per ``.txt`` paragraph.

    Raises:
        DataError: a file that is not UTF-8 text, an empty file, a line that is not JSON, a record without
        ``response`` (or
            ``prompt``, or usable ``messages``), naming the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    if "\0" in text:
        raise DataError(f"{path}: holds NUL bytes, a binary file rather than text")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".txt":
        return [paragraph.strip() for paragraph in text.split("\n\n") if paragraph.strip()]
    documents: list[list[dict[str, str]] | str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        documents.append(_messages(record, f"{path}, line {number}"))
    return documents


def _messages(record: object, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with prompt/response or messages")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise DataError(f"{where}: every message needs a role ({', '.join(ROLES)}) and a content string")
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        return messages
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: the record has no {key!r} (expected prompt and response, or messages)")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


# ---------------------------------------------------------------------------------- tokenising
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as ``(text, trained)`` pieces, in order."""
    if _has_chat_template(tokenizer):
        pieces, rendered = [], ""
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = (
                    tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
                    if index
                    else ""
                )
                pieces.append((prompt[len(rendered) :], False))
                rendered = prompt
            full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            if not full.startswith(rendered):
                raise DataError(
                    "the tokenizer's chat template renders a conversation differently from its prefixes; "
                    "use a plain template (remove chat_template) for this corpus"
                )
            pieces.append((full[len(rendered) :], message["role"] == "assistant"))
            rendered = full
        return pieces
    pieces = []
    for message in messages:
        pieces.append((PLAIN_ROLE_HEADER.format(role=message["role"].capitalize()), False))
        pieces.append(
            (message["content"] + ("" if message["role"] == "assistant" else "\n"), message["role"] == "assistant")
        )
    return pieces


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids that ask the model for a reply to ``prompt``, tokenised piece by piece exactly as
    :func:`tokenize_document` tokenised the conversations it trained on (a BPE merges across piece
    boundaries differently, and the model has only seen the pieces)."""
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = [text for text, _ in _segments(tokenizer, [{"role": "user", "content": prompt}])]
    pieces.append(PLAIN_ROLE_HEADER.format(role="Assistant"))
    return bos + [token for piece in pieces for token in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def tokenize_document(tokenizer, document: list[dict[str, str]] | str) -> tuple[list[int], list[bool]]:
    """Token ids of one document and, per token, whether the loss is computed on it."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(document, str):
        ids = bos + tokenizer(document, add_special_tokens=False)["input_ids"] + eos
        return ids, [True] * len(ids)
    chat = _has_chat_template(tokenizer)
    ids, trained = ([] if chat else list(bos)), ([] if chat else [False] * len(bos))
    for text, is_trained in _segments(tokenizer, document):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if is_trained and not chat:
            piece = piece + eos  # the plain template ends a reply with <eos>: the model learns to stop
        ids += piece
        trained += [is_trained] * len(piece)
    return ids, trained


def _tokenize_file(
    path: Path, tokenizer, tokenizer_dir: Path, cache: TensorCache | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(token_ids, trained, offsets, cache_hit)`` of every document in ``path``."""
    key = None
    if cache is not None:
        key = TensorCache.key(
            hash_file(path),
            describe(
                kind="text-corpus",
                tokenizer=tokenizer_fingerprint(tokenizer_dir),
                chat=getattr(tokenizer, "chat_template", None),
                header=PLAIN_ROLE_HEADER,
            ),
        )
        cached = cache.load(key)
        if cached is not None:
            return cached["token_ids"], cached["trained"].bool(), cached["offsets"], True
    all_ids: list[int] = []
    all_trained: list[bool] = []
    offsets = [0]
    for document in read_documents(path):
        ids, trained = tokenize_document(tokenizer, document)
        all_ids += ids
        all_trained += trained
        offsets.append(len(all_ids))
    token_ids = torch.tensor(all_ids, dtype=torch.int64)
    trained_mask = torch.tensor(all_trained, dtype=torch.bool)
    offsets_tensor = torch.tensor(offsets, dtype=torch.int64)
    if cache is not None:
        cache.save(key, {"token_ids": token_ids, "trained": trained_mask.to(torch.uint8), "offsets": offsets_tensor})
    return token_ids, trained_mask, offsets_tensor, False


# ---------------------------------------------------------------------------------- packing
class CausalLMDataset(Dataset):
    """Rows of token ids with their labels (``IGNORE_INDEX`` where no loss is computed)."""

    in_memory = True

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def pack_documents(
    documents: list[tuple[torch.Tensor, torch.Tensor]], max_length: int, packing: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lay whole documents end to end into rows of at most ``max_length`` tokens.

    Args:
        documents: ``(token_ids, labels)`` per document, each at most ``max_length`` long.
        max_length: tokens per row.
        packing: ``False`` keeps one document per row.

    Returns:
        ``(token_ids, labels)`` per row; a document's first label is ``IGNORE_INDEX`` so nothing
        is predicted across a boundary.
    """
    rows, row_ids, row_labels, length = [], [], [], 0
    for ids, labels in documents:
        labels = labels.clone()
        labels[0] = IGNORE_INDEX
        if row_ids and (not packing or length + len(ids) > max_length):
            rows.append((torch.cat(row_ids), torch.cat(row_labels)))
            row_ids, row_labels, length = [], [], 0
        row_ids.append(ids)
        row_labels.append(labels)
        length += len(ids)
    if row_ids:
        rows.append((torch.cat(row_ids), torch.cat(row_labels)))
    return rows


class CausalLMCollator:
    """Pad a batch of rows to its longest: pad id in ``input_ids``, 0 in ``attention_mask``,
    ``IGNORE_INDEX`` in ``labels``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(sample["input_ids"]) for sample in samples)
        batch = {
            "input_ids": torch.full((len(samples), length), self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.int64),
            "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.int64),
        }
        for row, sample in enumerate(samples):
            size = len(sample["input_ids"])
            for key in batch:
                batch[key][row, :size] = sample[key]
        return batch


def length_histogram(lengths: list[int], max_length: int) -> dict[str, int]:
    """Documents per length bucket (powers of two up to ``max_length``, then ``> max_length``)."""
    edges = [16]
    while edges[-1] < max_length:
        edges.append(edges[-1] * 2)
    edges[-1] = max_length
    histogram: dict[str, int] = {}
    lower = 1
    for edge in edges:
        histogram[f"{lower}-{edge}"] = sum(lower <= length <= edge for length in lengths)
        lower = edge + 1
    histogram[f">{max_length}"] = sum(length > max_length for length in lengths)
    return histogram


# ---------------------------------------------------------------------------------- the source
def build_text_corpus(config: DataConfig, seed: int):
    """The ``text-corpus`` source (see the module doc)."""
    from tightfit.data.bundle import DataBundle

    if config.augment:
        raise ConfigError(f"data.augment: {config.augment} are image augmentations; the text-corpus source takes none")
    files = corpus_files(config.path)
    if config.tokenizer is None:
        raise ConfigError(
            "data.tokenizer: the text-corpus source needs the model's tokenizer folder (e.g. the hf: model directory)"
        )
    tokenizer_dir = resolve_tokenizer_dir(config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    max_length = config.max_length or DEFAULT_MAX_LENGTH
    cache_dir = resolve_cache_dir(config.cache)
    cache = TensorCache(cache_dir, "tokens") if cache_dir is not None else None

    documents: list[tuple[torch.Tensor, torch.Tensor]] = []
    cache_hits = 0
    for path in files:
        token_ids, trained, offsets, hit = _tokenize_file(path, tokenizer, tokenizer_dir, cache)
        cache_hits += hit
        for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            ids = token_ids[start:stop]
            documents.append((ids, torch.where(trained[start:stop], ids, IGNORE_INDEX)))
    lengths = [len(ids) for ids, _ in documents]
    overlong = sum(length > max_length for length in lengths)
    if config.overlong == "drop":
        documents = [document for document in documents if len(document[0]) <= max_length]
    else:
        documents = [(ids[:max_length], labels[:max_length]) for ids, labels in documents]
    documents = [document for document in documents if (document[1] != IGNORE_INDEX).any()]
    if not documents:
        raise DataError(
            f"{config.path}: no document left with a token to train on (max_length {max_length}, overlong: "
            f"{config.overlong})"
        )

    split_seed = config.seed if config.seed is not None else seed
    splits = split_indices(
        len(documents), val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=split_seed
    )
    datasets = []
    split_rows = {}
    for name, indices in zip(("train", "val", "test"), splits):
        indices = limit_indices(indices, config.limit, split_seed) if len(indices) else indices
        # in the split's shuffled order: neighbours in a packed row are not the file's neighbours
        rows = pack_documents([documents[i] for i in indices], max_length, config.packing) if len(indices) else []
        split_rows[name] = {"documents": len(indices), "rows": len(rows)}
        datasets.append(CausalLMDataset(rows) if rows else None)
    tokens = sum(len(ids) for ids, _ in documents)
    trained_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in documents)
    metadata = {
        "source": "text-corpus",
        "path": ", ".join(str(path) for path in files),
        "tokenizer": str(tokenizer_dir),
        "template": "chat template" if _has_chat_template(tokenizer) else "plain",
        "max_length": max_length,
        "packing": config.packing,
        "documents": len(lengths),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "length_histogram": length_histogram(lengths, max_length),
        "overlong": {"documents": overlong, "action": "truncated" if config.overlong == "truncate" else "dropped"},
        "splits": split_rows,
        "split_seed": split_seed,
        "cache_hit": bool(files) and cache_hits == len(files),
    }
    metadata["summary"] = corpus_summary_line(metadata)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return DataBundle(
        train=datasets[0],
        val=datasets[1],
        test=datasets[2],
        num_classes=None,
        input_shape=None,
        class_names=None,
        collate_fn=CausalLMCollator(pad_token_id),
        task="causal-lm",
        metadata=metadata,
    )


def corpus_summary_line(metadata: dict) -> str:
    """One line for people: documents, tokens, the length histogram, what happened to long ones."""
    histogram = ", ".join(f"{bucket}: {count}" for bucket, count in metadata["length_histogram"].items() if count)
    splits = ", ".join(
        f"{name} {info['documents']} docs -> {info['rows']} rows" for name, info in metadata["splits"].items()
    )
    overlong = metadata["overlong"]
    return (
        f"text corpus: {metadata['documents']} documents, {metadata['tokens']:,} tokens "
        f"({metadata['trained_tokens']:,} with a loss, {metadata['template']} template); lengths {histogram}; "
        f"{overlong['documents']} longer than max_length {metadata['max_length']} ({overlong['action']}); "
        f"{'packed' if metadata['packing'] else 'one per row'}: {splits}"
    )
