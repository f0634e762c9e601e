"""Entity-level micro F1 for NER with ``seqeval``, and turning sub-word logits back into word tags."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from seqeval.metrics import f1_score

__all__ = ["entity_f1", "word_predictions"]


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Entity-level micro F1 (seqeval's default, conlleval-style matching) of tag sequences, in [0, 1]."""
    if len(gold) != len(predicted):
        raise ValueError(f"entity_f1 got {len(gold)} gold sentences but {len(predicted)} predicted ones.")
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"Sentence {i}: {len(g)} gold tags but {len(p)} predicted tags.")
    return float(
        f1_score([list(g) for g in gold], [list(p) for p in predicted], average="micro", zero_division=0)
    )


def word_predictions(
    logits: torch.Tensor,
    word_index: Sequence[Sequence[int]],
    n_words: Sequence[int],
    label_names: Sequence[str],
) -> list[list[str]]:
    """Word-level tags from sub-word ``logits`` ``[batch, length, labels]``.

    Each word takes the argmax at its first sub-word (``word_index[b][t] == word``, ``-1``/``-100``
    elsewhere); words cut off by ``max_length`` are tagged ``O`` so every sentence keeps its length.
    """
    best = logits.argmax(-1).tolist()
    sentences = []
    for b, (positions, length) in enumerate(zip(word_index, n_words, strict=True)):
        tags = ["O"] * length
        for t, word in enumerate(positions):
            if word >= 0 and t < len(best[b]):
                tags[word] = label_names[best[b][t]]
        sentences.append(tags)
    return sentences
