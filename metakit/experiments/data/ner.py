"""Token classification plumbing: sub-word label alignment, batching, and per-language episodes.

Words are split into sub-words by a fast tokenizer; the word's label goes on its first sub-word and
``-100`` (ignored by the loss) on the rest and on special tokens. Batches are dicts of tensors that a
``*ForTokenClassification`` model takes as ``model(**batch)``.

Example:
    >>> encoded = encode_ner(train, tokenizer, max_length=128)  # doctest: +SKIP
    >>> sampler = EpisodeSampler({"en": en, "es": es}, tokenizer, support_size=8, query_size=8)  # doctest: +SKIP
    >>> tasks = sampler.sample()  # one Task(support, query) per language  # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import DataCollatorForTokenClassification, PreTrainedTokenizerBase

from metakit.task import Task

__all__ = [
    "IGNORE_INDEX",
    "EpisodeSampler",
    "align_labels",
    "batches",
    "encode_ner",
    "make_collator",
    "model_inputs",
    "truncated_count",
]

IGNORE_INDEX = -100
#: Columns the model consumes; everything else in an encoded dataset is bookkeeping.
_MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Sub-word labels from ``word_ids()``: the word's label on its first sub-word, ``-100`` elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else int(word_labels[word]))
        previous = word
    return labels


def _first_subword_words(word_ids: Sequence[int | None]) -> list[int]:
    seen, words = None, []
    for word in word_ids:
        if word is not None and word != seen:
            words.append(word)
        seen = word
    return words


def encode_ner(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> Dataset:
    """Tokenize ``tokens`` and align ``ner_tags``; keeps the original columns next to the model inputs.

    Adds ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them),
    ``labels``, ``word_index`` (the word each labelled position starts, ``-1`` elsewhere) and
    ``n_words_kept`` (words that fit in ``max_length``; fewer than ``len(tokens)`` means truncated).
    Count truncated sentences with `truncated_count`.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"encode_ner needs a fast tokenizer (for word_ids()), got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels, word_index, kept = [], [], []
        for i, tags in enumerate(batch["ner_tags"]):
            word_ids = enc.word_ids(i)
            labels.append(align_labels(word_ids, tags))
            word_index.append(
                [
                    IGNORE_INDEX if lab == IGNORE_INDEX else w
                    for lab, w in zip(labels[-1], word_ids, strict=True)
                ]
            )
            kept.append(len(_first_subword_words(word_ids)))
        return {**enc, "labels": labels, "word_index": word_index, "n_words_kept": kept}

    return dataset.map(encode, batched=True, desc="aligning sub-word labels")


def truncated_count(encoded: Dataset) -> int:
    """How many sentences of an `encode_ner` dataset lost words to ``max_length``."""
    return sum(
        kept < len(tokens) for kept, tokens in zip(encoded["n_words_kept"], encoded["tokens"], strict=True)
    )


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForTokenClassification:
    """Pads a list of encoded rows into a dict of tensors (labels padded with ``-100``)."""
    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def model_inputs(encoded: Dataset) -> list[dict]:
    """Rows of ``encoded`` restricted to the model's columns, ready for the collator."""
    columns = [c for c in _MODEL_COLUMNS if c in encoded.column_names]
    return list(encoded.select_columns(columns))


def batches(
    rows: Sequence[dict],
    collator: DataCollatorForTokenClassification,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches of ``rows`` (``shuffle`` with ``seed``); the last batch may be smaller."""
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield dict(collator([rows[i] for i in order[start : start + batch_size]]))


@dataclass
class EpisodeSampler:
    """Makes meta-batches of ``Task(support, query)``: one task per language, disjoint support and query.

    Args:
        languages: ``{lang: encoded dataset}`` (from `encode_ner`), e.g. the source languages.
        tokenizer: the tokenizer the datasets were encoded with (for padding).
        support_size: sentences in a support batch.
        query_size: sentences in a query batch.
        seed: makes the sequence of meta-batches reproducible.
    """

    languages: Mapping[str, Dataset]
    tokenizer: PreTrainedTokenizerBase
    support_size: int = 8
    query_size: int = 8
    seed: int = 0
    _rows: dict[str, list[dict]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("EpisodeSampler needs at least one language.")
        need = self.support_size + self.query_size
        self._rows = {}
        for lang, encoded in self.languages.items():
            if len(encoded) < need:
                raise ValueError(
                    f"Language {lang!r} has {len(encoded)} sentences; an episode needs support_size + "
                    f"query_size = {need}."
                )
            self._rows[lang] = model_inputs(encoded)
        self._collator = make_collator(self.tokenizer)
        self._random = random.Random(self.seed)

    def sample(self) -> list[Task]:
        """One task per language, in the order of ``languages``."""
        tasks = []
        for rows in self._rows.values():
            picked = self._random.sample(range(len(rows)), self.support_size + self.query_size)
            support = dict(self._collator([rows[i] for i in picked[: self.support_size]]))
            query = dict(self._collator([rows[i] for i in picked[self.support_size :]]))
            tasks.append(Task(support=support, query=query))
        return tasks

    def state_dict(self) -> dict:
        """The sampler's random state, for checkpoints."""
        return {"random": self._random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`, so a resumed run draws the same episodes."""
        self._random.setstate(state["random"])
