"""Task samplers and data: sine regression, cross-lingual NER on WikiAnn."""

from metakit.tasks.metrics import entity_f1, word_predictions
from metakit.tasks.ner import (
    EpisodeSampler,
    align_labels,
    batches,
    encode_ner,
    make_collator,
    truncated_count,
)
from metakit.tasks.sine import SineTasks, mse_loss, sine_mlp
from metakit.tasks.wikiann import WIKIANN_LABELS, load_wikiann, read_wikiann_tsv, subsample, wikiann_features

__all__ = [
    "WIKIANN_LABELS",
    "EpisodeSampler",
    "SineTasks",
    "align_labels",
    "batches",
    "encode_ner",
    "entity_f1",
    "load_wikiann",
    "make_collator",
    "mse_loss",
    "read_wikiann_tsv",
    "sine_mlp",
    "subsample",
    "truncated_count",
    "wikiann_features",
    "word_predictions",
]
