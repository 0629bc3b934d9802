"""How hard is the packaged text set? Baselines that do not fine-tune anything.

    python benchmarks/text_dataset_baselines.py [--finetune-epochs 4]

On the split every recipe uses (``packaged:support-messages``, seed 0, 70/15/15 stratified):

* word and word-pair TF-IDF + logistic regression: what keywords alone get;
* the frozen packaged MiniLM, mean-pooled, + logistic regression: what the pretrained sentence
  embedding gets without fine-tuning (the baseline the LoRA recipe must beat);
* with ``--finetune-epochs N``: the same MiniLM fully fine-tuned (plain PyTorch loop, AdamW
  5e-5, batch 16, seed 0), test accuracy at the epoch best on validation: what is learnable.

The regularisation strength C is chosen on the validation split; test accuracy is reported at
that C. Prints a table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from tightfit.data import build_datasets
from tightfit.data.csv_table import read_csv
from tightfit.data.splits import split_indices
from tightfit.data.text import default_tokenizer_dir

C_VALUES = (0.1, 1.0, 10.0, 100.0)


def best_on_validation(train, val, test) -> tuple[float, float, float]:
    """``(C, val accuracy, test accuracy)`` of the logistic regression best on validation."""
    scored = []
    for c in C_VALUES:
        model = LogisticRegression(C=c, max_iter=5000).fit(*train)
        scored.append((model.score(*val), c, model.score(*test)))
    val_accuracy, c, test_accuracy = max(scored)
    return c, val_accuracy, test_accuracy


def finetune(bundle, epochs: int) -> tuple[int, float, float]:
    """``(best epoch, val accuracy, test accuracy)`` of a full fine-tune of the packaged MiniLM."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(default_tokenizer_dir()), num_labels=bundle.num_classes
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    shuffled = DataLoader(
        bundle.train,
        batch_size=16,
        shuffle=True,
        collate_fn=bundle.collate_fn,
        generator=torch.Generator().manual_seed(0),
    )

    def accuracy(split) -> float:
        model.eval()
        correct = 0
        with torch.inference_mode():
            for batch in DataLoader(split, batch_size=64, collate_fn=bundle.collate_fn):
                correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        return correct / len(split)

    best = (-1.0, 0, 0.0)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in shuffled:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        val_accuracy = accuracy(bundle.val)
        if val_accuracy > best[0]:
            best = (val_accuracy, epoch, accuracy(bundle.test))
    return best[1], best[0], best[2]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune MiniLM fully for N epochs")
    args = parser.parse_args()
    bundle = build_datasets({"source": "text-csv", "path": "packaged:support-messages", "seed": 0})
    header, rows, _ = read_csv(Path(bundle.metadata["path"]))
    texts = np.array([row[header.index("text")] for row in rows])
    names = [row[header.index("label")] for row in rows]
    labels = np.array([bundle.class_names.index(name) for name in names])
    # The same split build_datasets drew (same seed, same stratification).
    splits = split_indices(len(rows), val_fraction=0.15, test_fraction=0.15, seed=0, labels=labels)

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts[splits[0]])
    tfidf = [(vectorizer.transform(texts[s]), labels[s]) for s in splits]

    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(default_tokenizer_dir())).eval()

    def embed(split):
        features, targets = [], []
        with torch.inference_mode():
            for batch in DataLoader(split, batch_size=64, collate_fn=bundle.collate_fn):
                hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                features.append((hidden * mask).sum(1) / mask.sum(1))
                targets.append(batch["labels"])
        return torch.cat(features).numpy(), torch.cat(targets).numpy()

    frozen = [embed(split) for split in (bundle.train, bundle.val, bundle.test)]
    print(f"packaged:support-messages, {bundle.sizes()}, classes {bundle.class_names}")
    print(f"{'baseline':<40} {'C':>6} {'val acc':>8} {'test acc':>9}")
    for name, data in (
        ("TF-IDF words+pairs, logistic regression", tfidf),
        ("frozen MiniLM mean-pool, logistic reg.", frozen),
    ):
        c, val_accuracy, test_accuracy = best_on_validation(*data)
        print(f"{name:<40} {c:>6g} {val_accuracy:>8.3f} {test_accuracy:>9.3f}")
    if args.finetune_epochs:
        epoch, val_accuracy, test_accuracy = finetune(bundle, args.finetune_epochs)
        print(
            f"{'MiniLM fully fine-tuned (epoch ' + str(epoch) + ')':<40} {'-':>6} {val_accuracy:>8.3f} "
            f"{test_accuracy:>9.3f}"
        )


if __name__ == "__main__":
    main()
