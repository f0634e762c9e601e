"""A labelled text-classification data set from anywhere, in the few-shot experiment's form.

`load_text_classification` reads a local file (CSV, TSV, JSON, JSON Lines, Parquet), a local folder
of such files (``train.csv``, ``test.csv``, ... as `datasets.load_dataset` finds them) or a Hugging
Face hub data set (name, config, split), all through `datasets.load_dataset`, and returns a
`datasets.Dataset` with the columns every few-shot task has (`text_features`): ``text_a``,
``text_b`` (the second text of a pair, else ``None``) and ``label`` (a string; a `datasets.ClassLabel`
gives its names). That is the form `FewShotSampler` and the few-shot runner take.

Bad input raises `TaskDataError` (a ``ValueError``) or ``FileNotFoundError`` with one line that names
what is wrong and what to do: a column that does not exist (and the columns there are), an empty file,
a row without text or label, a hub data set that cannot be reached.

Example:
    >>> data = load_text_classification("tickets.csv", text="message", label="team")  # doctest: +SKIP
    >>> data.column_names, data[0]["label"]  # doctest: +SKIP
    (['text_a', 'text_b', 'label'], 'billing')
    >>> pairs = load_text_classification("nyu-mll/glue", config="rte", split="validation",
    ...                                  text=["sentence1", "sentence2"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, load_dataset
from datasets import Sequence as SequenceFeature

from metakit.experiments.data.leopard import text_features
from metakit.experiments.data.locate import _offline

__all__ = ["FILE_FORMATS", "TaskDataError", "content_digest", "load_text_classification"]

#: File suffix → (`datasets.load_dataset` builder, its extra keyword arguments).
FILE_FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


class TaskDataError(ValueError):
    """A text-classification data set that cannot be used as asked (its message says why and what to do)."""


def load_text_classification(
    source: str | os.PathLike,
    *,
    text: str | Sequence[str] = "text",
    label: str = "label",
    split: str = "train",
    config: str | None = None,
    from_hub: bool | None = None,
    name: str | None = None,
) -> Dataset:
    """A labelled text data set as ``text_a``, ``text_b``, ``label`` columns (rows in the source's order).

    Args:
        source: a local file (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``), a local folder of
            such files, or a Hugging Face hub data set name.
        text: the text column, or two columns for a sentence-pair task (``["premise", "hypothesis"]``).
        label: the label column; integers become strings, a ``ClassLabel`` its names.
        split: which split (a folder's ``test.csv`` is its ``"test"`` split; a single file is ``"train"``).
        config: the hub data set's configuration name.
        from_hub: ``None`` reads ``source`` locally if it exists and from the hub otherwise; ``False``
            only locally (a missing path is an error, not a hub name); ``True`` only from the hub.
        name: what to call the data set in messages (default: ``source``).

    Raises:
        FileNotFoundError: a local ``source`` that does not exist.
        TaskDataError: an empty file, a missing column, a row without text or label, a hub data set that
            cannot be loaded.
    """
    columns = [text] if isinstance(text, str) else list(text)
    if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
        raise TaskDataError(
            f"text must name one column or two (a sentence pair), e.g. 'text' or ['premise', 'hypothesis'], "
            f"got {text!r}."
        )
    where = name or str(source)
    path = Path(source).expanduser()
    local = path.exists() if from_hub is None else not from_hub
    if local:
        raw, shown = _load_local(path, split, where), str(path)
    else:
        raw, shown = _load_hub(str(source), config, split, where), f"hub data set {str(source)!r}"
    return _to_task_form(raw, columns, label, where, shown)


def _load_local(path: Path, split: str, where: str) -> Dataset:
    if not path.exists():
        raise FileNotFoundError(f"{where}: {str(path)!r} does not exist; give an existing file or folder.")
    if path.is_file():
        builder, options = _format(path, where)
        if path.stat().st_size == 0:
            raise TaskDataError(
                f"{where}: {str(path)!r} is empty; it needs a header row and labelled examples."
            )
        if split != "train":
            raise TaskDataError(
                f"{where}: {str(path)!r} is one file, which holds only the 'train' split, not {split!r}; "
                "give the other split as its own file."
            )
        return _load(where, str(path), builder, data_files=str(path), split="train", **options)
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS]
    if not files:
        raise TaskDataError(
            f"{where}: folder {str(path)!r} holds no {'/'.join(sorted(FILE_FORMATS))} file; put the data there "
            "as train.csv (and test.csv, ...) or point at the file itself."
        )
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise TaskDataError(f"{where}: {empty[0]!r} is empty; it needs a header row and labelled examples.")
    return _load(where, str(path), str(path), split=split)


def _format(path: Path, where: str) -> tuple[str, dict]:
    if path.suffix not in FILE_FORMATS:
        raise TaskDataError(
            f"{where}: {str(path)!r} is not a file format metakit reads; use one of "
            f"{', '.join(sorted(FILE_FORMATS))}."
        )
    builder, options = FILE_FORMATS[path.suffix]
    return builder, dict(options)


def _load(where: str, shown: str, *args, **kwargs) -> Dataset:
    try:
        data = load_dataset(*args, **kwargs)
    except ValueError as error:
        if "data_files" in kwargs and "corresponds to no data" in str(error):  # a header and no rows
            raise TaskDataError(f"{where}: {shown!r} holds no examples; add labelled rows.") from None
        if "corresponds to no data" in str(error) or "Unknown split" in str(error):
            raise TaskDataError(
                f"{where}: {shown!r} has no {kwargs.get('split')!r} split; a folder's splits are its files' "
                "names (train.csv, test.csv, ...)."
            ) from None
        raise TaskDataError(f"{where}: {shown!r} could not be read: {_first_line(error)}") from None
    except Exception as error:  # datasets wraps a parser's error (a malformed CSV, JSON) in its own
        cause = error.__cause__ or error.__context__ or error
        raise TaskDataError(
            f"{where}: {shown!r} could not be read ({type(cause).__name__}: {_first_line(cause)}); check "
            "that it is well-formed."
        ) from None
    if len(data) == 0:
        raise TaskDataError(f"{where}: {shown!r} holds no examples; add labelled rows.")
    return data


def _load_hub(name: str, config: str | None, split: str, where: str) -> Dataset:
    try:
        data = load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name, unknown config or split: one line each way
        reason = f"{type(error).__name__}: {_first_line(error)}"
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache; download it once with network access "
            "or point `path` at local files"
            if _offline()
            else "check the name, config and split on the hub, or point `path` at local files"
        )
        shown = name + (f" (config {config!r})" if config else "")
        raise TaskDataError(
            f"{where}: hub data set {shown} split {split!r} could not be loaded ({reason}); {hint}."
        ) from None
    if len(data) == 0:
        raise TaskDataError(f"{where}: hub data set {name!r} split {split!r} holds no examples.")
    return data


def _to_task_form(raw: Dataset, text: list[str], label: str, where: str, shown: str) -> Dataset:
    missing = [c for c in [*text, label] if c not in raw.column_names]
    if missing:
        kind = "label column" if missing == [label] and label not in text else "column"
        plural = "s" if len(missing) > 1 else ""
        raise TaskDataError(
            f"{where}: {kind}{plural} {', '.join(repr(c) for c in missing)} not in {shown}; its columns are "
            f"{raw.column_names}. Name them with text = ... and label = ...."
        )
    feature = raw.features[label]
    if isinstance(feature, SequenceFeature | list):
        raise TaskDataError(
            f"{where}: label column {label!r} of {shown} holds lists (multi-label data); a task needs one "
            "label per example."
        )
    names = feature.names if isinstance(feature, ClassLabel) else None
    columns = raw.select_columns([*dict.fromkeys([*text, label])]).to_dict()
    labels = []
    for row, value in enumerate(columns[label]):
        if value is None or (names is not None and value < 0):
            raise TaskDataError(
                f"{where}: row {row} of {shown} has no label in column {label!r}; label every example or "
                "drop the unlabelled ones."
            )
        labels.append(names[value] if names is not None else str(value))
    texts = []
    for column in text:
        values = columns[column]
        empty = [row for row, value in enumerate(values) if value is None]
        if empty:
            raise TaskDataError(
                f"{where}: {len(empty)} row(s) of {shown} have no text in column {column!r} (first: row "
                f"{empty[0]}); fill or drop them."
            )
        texts.append([str(value) for value in values])
    return Dataset.from_dict(
        {
            "text_a": texts[0],
            "text_b": texts[1] if len(texts) == 2 else [None] * len(labels),
            "label": labels,
        },
        features=text_features(),
    )


def content_digest(data: Dataset) -> str:
    """A SHA-256 of the texts and labels (in order): the same whatever file format they came from."""
    digest = hashlib.sha256()
    for row in zip(data["text_a"], data["text_b"], data["label"], strict=True):
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
