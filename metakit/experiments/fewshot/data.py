"""Tokenise few-shot datasets (``text_a``, ``text_b``, label ids) into encoder inputs and batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from metakit.prototype import PrototypeBatch

__all__ = ["encode_texts", "episode_batch", "input_batches"]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    text_a: Sequence[str],
    text_b: Sequence[str | None],
    max_length: int,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Padded encoder inputs of single sentences or sentence pairs (pairs truncated longest-first)."""
    first = [prefix + text for text in text_a]
    pairs = [b for b in text_b if b is not None]
    if pairs and len(pairs) != len(text_b):
        raise ValueError("A batch mixes sentence pairs and single sentences; a task is one or the other.")
    out = tokenizer(
        first,
        list(pairs) if pairs else None,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    return dict(out)


def episode_batch(
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    max_length: int,
    prefix: str = "",
    support: PrototypeBatch | None = None,
) -> PrototypeBatch:
    """A `PrototypeBatch` of every row of ``data`` (needs a ``label_id`` column)."""
    inputs = encode_texts(tokenizer, data["text_a"], data["text_b"], max_length, prefix)
    labels = torch.tensor(data["label_id"], dtype=torch.long)
    n = support.n_classes if support is not None else int(labels.max()) + 1
    return PrototypeBatch(inputs, labels, n, support=support)


def input_batches(
    tokenizer: PreTrainedTokenizerBase, data: Dataset, max_length: int, batch_size: int, prefix: str = ""
) -> Iterator[dict[str, torch.Tensor]]:
    """Encoder inputs of ``data`` in order, ``batch_size`` rows at a time."""
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        yield encode_texts(tokenizer, rows["text_a"], rows["text_b"], max_length, prefix)


def at_max_length(inputs: dict[str, torch.Tensor], max_length: int) -> int:
    """How many rows fill all ``max_length`` positions (were probably truncated)."""
    return int((inputs["attention_mask"].sum(1) >= max_length).sum())
