"""The experiments' data sets: cross-lingual NER on WikiAnn, the LEOPARD target tasks with their
official k-shot episodes, the GLUE-style meta-training pool, your own labelled text from a file, a
folder or the hub (`load_text_classification`) with seeded k-shot episodes (`kshot_episode`),
N-way k-shot episodes, and entity F1.

Each data set is found from an explicit path, an environment variable, the Hugging Face hub where it
is there, and last the development folder beside the repository (`metakit.experiments.data.locate`).
"""

from metakit.experiments.data.episodes import Episode, FewShotSampler
from metakit.experiments.data.glue_meta import GLUE_META_TASKS, load_glue_meta, load_glue_meta_pool
from metakit.experiments.data.kshot import held_out_split, kshot_episode
from metakit.experiments.data.leopard import (
    LEOPARD_TASKS,
    EmptyEpisodeError,
    leopard_episodes,
    load_leopard_episode,
    load_leopard_test,
    stratified_subsample,
)
from metakit.experiments.data.metrics import entity_f1, word_predictions
from metakit.experiments.data.ner import (
    EpisodeSampler,
    align_labels,
    batches,
    encode_ner,
    make_collator,
    truncated_count,
)
from metakit.experiments.data.text_tasks import TaskDataError, load_text_classification
from metakit.experiments.data.wikiann import (
    WIKIANN_LABELS,
    load_wikiann,
    read_wikiann_tsv,
    subsample,
    wikiann_features,
)

__all__ = [
    "GLUE_META_TASKS",
    "LEOPARD_TASKS",
    "WIKIANN_LABELS",
    "EmptyEpisodeError",
    "Episode",
    "EpisodeSampler",
    "FewShotSampler",
    "TaskDataError",
    "align_labels",
    "batches",
    "encode_ner",
    "entity_f1",
    "held_out_split",
    "kshot_episode",
    "leopard_episodes",
    "load_glue_meta",
    "load_glue_meta_pool",
    "load_leopard_episode",
    "load_leopard_test",
    "load_text_classification",
    "load_wikiann",
    "make_collator",
    "read_wikiann_tsv",
    "stratified_subsample",
    "subsample",
    "truncated_count",
    "wikiann_features",
    "word_predictions",
]
