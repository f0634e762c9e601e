"""Task samplers and data: sine regression, cross-lingual NER on WikiAnn, few-shot text classification
(the LEOPARD target tasks, the GLUE-style meta-training pool, N-way k-shot episodes).

The NER and few-shot parts pull in ``datasets`` and ``seqeval`` (seconds to import), so they load on first use:
``metakit.tasks.load_wikiann`` works as usual, ``import metakit`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from metakit.tasks.sine import SineTasks, mse_loss, sine_mlp

_LAZY = {
    "entity_f1": "metakit.tasks.metrics",
    "word_predictions": "metakit.tasks.metrics",
    "EpisodeSampler": "metakit.tasks.ner",
    "align_labels": "metakit.tasks.ner",
    "batches": "metakit.tasks.ner",
    "encode_ner": "metakit.tasks.ner",
    "make_collator": "metakit.tasks.ner",
    "truncated_count": "metakit.tasks.ner",
    "WIKIANN_LABELS": "metakit.tasks.wikiann",
    "load_wikiann": "metakit.tasks.wikiann",
    "read_wikiann_tsv": "metakit.tasks.wikiann",
    "subsample": "metakit.tasks.wikiann",
    "wikiann_features": "metakit.tasks.wikiann",
    "EmptyEpisodeError": "metakit.tasks.leopard",
    "LEOPARD_TASKS": "metakit.tasks.leopard",
    "leopard_episodes": "metakit.tasks.leopard",
    "load_leopard_episode": "metakit.tasks.leopard",
    "load_leopard_test": "metakit.tasks.leopard",
    "stratified_subsample": "metakit.tasks.leopard",
    "GLUE_META_TASKS": "metakit.tasks.glue_meta",
    "load_glue_meta": "metakit.tasks.glue_meta",
    "load_glue_meta_pool": "metakit.tasks.glue_meta",
    "Episode": "metakit.tasks.episodes",
    "FewShotSampler": "metakit.tasks.episodes",
}

__all__ = ["SineTasks", "mse_loss", "sine_mlp", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metakit.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
