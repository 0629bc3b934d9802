"""CSV tables: numeric and categorical feature columns plus one target column.

Every choice fitted to the data — the mean that fills a missing cell, the categories of a text
column, the standardisation of each feature — is fitted on the training rows only, so nothing
about the validation or test rows leaks into training. The target decides the task: text
labels, or whole numbers with at most :data:`MAX_AUTO_CLASSES` distinct values, make a
classification; anything else a regression (override with ``task:``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from tightfit.data.config import DataConfig, DataError
from tightfit.data.splits import split_indices
from tightfit.errors import ConfigError

MAX_AUTO_CLASSES = 20
MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        sample = handle.read(16384)
        handle.seek(0)
        # The header names the columns and rarely holds punctuation, so the delimiters it
        # contains are the candidates; sniffing the whole sample could pick a ';' from a sentence.
        candidates = "".join(d for d in ",;\t|" if d in sample.partition("\n")[0])
        if len(candidates) == 1:
            dialect = csv.excel
            delimiter = candidates
        else:
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=candidates or ",;\t|")
                delimiter = dialect.delimiter
            except csv.Error:
                dialect, delimiter = csv.excel, "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.reader(handle, dialect, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file, expected a header row")
        header = [name.strip() for name in header]
        rows, lines = [], []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} cells but the header has {len(header)}")
            rows.append([cell.strip() for cell in row])
            lines.append(reader.line_num)
    return header, rows, lines


def read_csv(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows and the line number of each row of a CSV (or TSV) file.

    Blank lines are skipped; a quoted cell may span lines (the line numbers say where each row
    ends, which is where an editor shows it). The delimiter is detected from the header.

    Raises:
        DataError: an empty file, or a row whose number of cells differs from the header's.
    """
    try:
        header, rows, lines = _read_rows(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{path}: a header but no rows")
    return header, rows, lines


def _parse_number(cell: str) -> float | None:
    """The cell as a float, ``nan`` for a missing value, ``None`` when it is text."""
    if cell.lower() in MISSING:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return None


def check_columns(header: list[str], wanted: list[str], key: str, path: Path) -> None:
    """Raise :class:`ConfigError` naming ``key`` when a wanted column is not in the header."""
    import difflib

    for name in wanted:
        if name not in header:
            lowered = {column.lower(): column for column in header}
            close = [lowered[name.lower()]] if name.lower() in lowered else difflib.get_close_matches(name, header, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: no column {name!r} in {path}{hint} (columns: {', '.join(header)})")


def _encode_target(values: list[str], lines: list[int], task: str, path: Path, column: str):
    """Targets as class indices (with their names) or floats, and the task they imply."""
    numbers = [_parse_number(value) for value in values]
    for line, number in zip(lines, numbers):
        if number is not None and math.isnan(number):
            raise DataError(f"{path}, line {line}: the target column {column!r} is empty")
    numeric = all(number is not None for number in numbers)
    if task == "auto":
        whole = numeric and all(float(number).is_integer() for number in numbers)
        task = "classification" if not numeric or (whole and len(set(numbers)) <= MAX_AUTO_CLASSES) else "regression"
    if task == "regression":
        if not numeric:
            row = next(i for i, number in enumerate(numbers) if number is None)
            raise DataError(
                f"{path}, line {lines[row]}: target {values[row]!r} in column {column!r} is not a number "
                "(a regression needs numbers; set data.task: classification for labels)"
            )
        return np.array(numbers, dtype=np.float32), None, task
    if numeric:
        names = sorted(set(numbers))
        labels = [str(int(n)) if float(n).is_integer() else str(n) for n in names]
        index = {number: i for i, number in enumerate(names)}
        return np.array([index[n] for n in numbers], dtype=np.int64), labels, task
    names = sorted(set(values))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[value] for value in values], dtype=np.int64), names, task


def _encode_features(columns: dict[str, list[str]], train: np.ndarray) -> tuple[np.ndarray, list[str], dict]:
    """A float matrix of the features: numbers as they are, text columns one-hot.

    Missing numbers take the training mean of their column; categories are those seen in
    training (an unseen one encodes as all zeros).
    """
    blocks, names, fitted = [], [], {"imputed_cells": 0, "categorical": {}}
    for name, cells in columns.items():
        numbers = [_parse_number(cell) for cell in cells]
        if all(number is not None for number in numbers):
            values = np.array(numbers, dtype=np.float64)
            train_values = values[train]
            fill = float(np.nanmean(train_values)) if np.isfinite(train_values).any() else 0.0
            missing = np.isnan(values)
            fitted["imputed_cells"] += int(missing.sum())
            values[missing] = fill
            blocks.append(values[:, None])
            names.append(name)
        else:
            categories = sorted({cells[i] for i in train if cells[i].lower() not in MISSING})
            index = {category: i for i, category in enumerate(categories)}
            one_hot = np.zeros((len(cells), len(categories)))
            for row, cell in enumerate(cells):
                if cell in index:
                    one_hot[row, index[cell]] = 1.0
            blocks.append(one_hot)
            names.extend(f"{name}={category}" for category in categories)
            fitted["categorical"][name] = categories
    return np.concatenate(blocks, axis=1).astype(np.float32), names, fitted


def build_csv(config: DataConfig, seed: int):
    """The ``csv`` source (see the module doc)."""
    from tightfit.data.tensors import bundle_from_arrays

    if config.path is None:
        raise ConfigError("data.path: the csv source needs a .csv file")
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path: no such file {path}")
    header, rows, lines = read_csv(path)
    target = config.columns.target or header[-1]
    check_columns(header, [target], "data.columns.target", path)
    features = config.columns.features or [name for name in header if name != target]
    check_columns(header, features, "data.columns.features", path)
    if target in features:
        raise ConfigError(f"data.columns.features: the target column {target!r} cannot also be a feature")
    if not features:
        raise ConfigError(f"data.columns.features: {path} has no column besides the target {target!r}")

    position = {name: i for i, name in enumerate(header)}
    targets, class_names, task = _encode_target(
        [row[position[target]] for row in rows], lines, config.task, path, target
    )
    split_seed = config.seed if config.seed is not None else seed
    splits = split_indices(
        len(rows),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=split_seed,
        labels=targets if (task == "classification" and config.stratify) else None,
    )
    inputs, feature_names, fitted = _encode_features(
        {name: [row[position[name]] for row in rows] for name in features}, splits[0]
    )
    config = config.model_copy(update={"task": task})
    return bundle_from_arrays(
        inputs,
        targets,
        config,
        seed,
        class_names=class_names,
        normalize="standard" if config.normalize == "auto" else config.normalize,
        source="csv",
        splits=splits,
        metadata={"path": str(path), "target": target, "features": feature_names, **fitted},
    )
