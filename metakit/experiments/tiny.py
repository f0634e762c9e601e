"""A tiny BERT and WordPiece tokenizer built from scratch: offline stand-ins for tests and smoke runs."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForTokenClassification, PreTrainedTokenizerFast

__all__ = ["tiny_bert", "tiny_bert_config", "tiny_tokenizer"]

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(words: Iterable[str], max_piece: int = 3) -> PreTrainedTokenizerFast:
    """A fast WordPiece tokenizer whose vocabulary is the first ``max_piece`` characters of each word.

    Words longer than ``max_piece`` split into several sub-words (``"Berlin"`` → ``"Ber" "##lin"``),
    which exercises label alignment; unknown characters map to ``[UNK]``.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIALS)}
    for word in words:
        pieces = [word[i : i + max_piece] for i in range(0, len(word), max_piece)]
        for j, piece in enumerate(pieces):
            vocab.setdefault(piece if j == 0 else f"##{piece}", len(vocab))
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def tiny_bert_config(vocab_size: int, hidden: int = 32, layers: int = 2, **extra) -> BertConfig:
    """The config of a BERT small enough for unit tests (2 heads, feed-forward 2 × hidden)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        **extra,
    )


def tiny_bert(vocab_size: int, num_labels: int, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised ``BertForTokenClassification`` small enough for unit tests."""
    import torch

    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(vocab_size, hidden, layers, num_labels=num_labels))
