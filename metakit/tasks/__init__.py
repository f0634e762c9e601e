"""Task samplers of the core: sine regression (MAML's classic), with its MLP and loss.

The experiments' data sets — cross-lingual NER on WikiAnn, the LEOPARD target tasks, the GLUE-style
meta-training pool, N-way k-shot episodes — live in `metakit.experiments.data` (the
``experiments`` extra). Their old names here still work for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from metakit.tasks.sine import SineTasks, mse_loss, sine_mlp

_LAZY = {
    "entity_f1": "metakit.experiments.data.metrics",
    "word_predictions": "metakit.experiments.data.metrics",
    "EpisodeSampler": "metakit.experiments.data.ner",
    "align_labels": "metakit.experiments.data.ner",
    "batches": "metakit.experiments.data.ner",
    "encode_ner": "metakit.experiments.data.ner",
    "make_collator": "metakit.experiments.data.ner",
    "truncated_count": "metakit.experiments.data.ner",
    "WIKIANN_LABELS": "metakit.experiments.data.wikiann",
    "load_wikiann": "metakit.experiments.data.wikiann",
    "read_wikiann_tsv": "metakit.experiments.data.wikiann",
    "subsample": "metakit.experiments.data.wikiann",
    "wikiann_features": "metakit.experiments.data.wikiann",
    "EmptyEpisodeError": "metakit.experiments.data.leopard",
    "LEOPARD_TASKS": "metakit.experiments.data.leopard",
    "leopard_episodes": "metakit.experiments.data.leopard",
    "load_leopard_episode": "metakit.experiments.data.leopard",
    "load_leopard_test": "metakit.experiments.data.leopard",
    "stratified_subsample": "metakit.experiments.data.leopard",
    "GLUE_META_TASKS": "metakit.experiments.data.glue_meta",
    "load_glue_meta": "metakit.experiments.data.glue_meta",
    "load_glue_meta_pool": "metakit.experiments.data.glue_meta",
    "Episode": "metakit.experiments.data.episodes",
    "FewShotSampler": "metakit.experiments.data.episodes",
}

__all__ = ["SineTasks", "mse_loss", "sine_mlp"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        warnings.warn(
            f"metakit.tasks.{name} moved to {_LAZY[name]}.{name} (the 'experiments' extra); the old name "
            "goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metakit.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
