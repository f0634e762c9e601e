"""N-way k-shot episodes over a pool of classification datasets: one task = one dataset.

An episode picks a task, then ``N`` of its classes (``N`` ≤ its label count), then ``k`` support and
``q`` query examples per class, without overlap. Labels are renumbered ``0..N-1`` in the order the
classes were drawn, so tasks with different label sets feed one learner (with a prototype head,
`metakit.prototype`).

Example:
    >>> sampler = FewShotSampler(load_glue_meta_pool(), n_way=2, k_shot=8, q_query=8, seed=0)  # doctest: +SKIP
    >>> episode = sampler.sample()  # doctest: +SKIP
    >>> len(episode.support), len(episode.query)  # doctest: +SKIP
    (16, 16)
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from datasets import Dataset, Value

__all__ = ["Episode", "FewShotSampler", "label_ids"]


@dataclass
class Episode:
    """One N-way episode.

    Attributes:
        task: the pool task it came from.
        classes: the label names, in the order of their ids ``0..N-1``.
        support, query: rows of the task with an added ``label_id`` column.
    """

    task: str
    classes: list[str]
    support: Dataset
    query: Dataset

    @property
    def n_way(self) -> int:
        """The number of classes."""
        return len(self.classes)


def label_ids(data: Dataset, classes: list[str]) -> Dataset:
    """``data`` with a ``label_id`` column: each row's label's index in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    missing = sorted(set(data["label"]) - set(index))
    if missing:
        raise ValueError(f"Labels {missing} are not among the episode's classes {classes}.")
    columns = data.to_dict()
    columns["label_id"] = [index[label] for label in columns["label"]]
    features = data.features.copy()
    features["label_id"] = Value("int64")
    # from_dict, not add_column: add_column after select() flattens indices with a progress bar per call.
    return Dataset.from_dict(columns, features=features)


class FewShotSampler:
    """Seeded N-way k-shot episodes over ``pool`` (task name → dataset with a ``label`` column).

    Args:
        pool: the tasks; each needs at least 2 labels with ``k_shot + q_query`` examples.
        n_way: classes per episode; ``None`` uses every class of the drawn task. An int must not exceed
            any task's label count (checked here; the error names the task).
        k_shot, q_query: support and query examples per class.
        seed: the episodes are a function of the seed and the number of calls to `sample`.
    """

    def __init__(
        self,
        pool: Mapping[str, Dataset],
        n_way: int | None,
        k_shot: int,
        q_query: int,
        seed: int = 0,
    ):
        if not pool:
            raise ValueError("FewShotSampler needs at least one task in the pool.")
        if k_shot < 1 or q_query < 0:
            raise ValueError(f"k_shot must be >= 1 and q_query >= 0, got k_shot={k_shot}, q_query={q_query}.")
        if n_way is not None and n_way < 2:
            raise ValueError(f"n_way must be >= 2 (or None for all classes), got {n_way}.")
        self.pool, self.n_way, self.k_shot, self.q_query = dict(pool), n_way, k_shot, q_query
        self.rng = random.Random(seed)
        need = k_shot + q_query
        self._rows: dict[str, dict[str, list[int]]] = {}
        for name, data in self.pool.items():
            by_label: dict[str, list[int]] = defaultdict(list)
            for i, label in enumerate(data["label"]):
                by_label[label].append(i)
            usable = {label: rows for label, rows in sorted(by_label.items()) if len(rows) >= need}
            want = n_way if n_way is not None else max(2, len(by_label))
            if len(usable) < want:
                raise ValueError(
                    f"Task {name!r} has {len(usable)} labels with >= {need} examples (k_shot + q_query) "
                    f"of {len(by_label)} labels, fewer than n_way={want}; lower n_way, k_shot or q_query, "
                    "or leave the task out of the pool."
                )
            self._rows[name] = usable
        self.tasks = sorted(self.pool)

    def sample(self, task: str | None = None) -> Episode:
        """One episode from ``task`` (default: a task drawn uniformly from the pool)."""
        if task is None:
            task = self.rng.choice(self.tasks)
        elif task not in self._rows:
            raise ValueError(f"Task {task!r} is not in the sampler's pool {self.tasks}.")
        rows = self._rows[task]
        n = self.n_way if self.n_way is not None else len(rows)
        classes = self.rng.sample(sorted(rows), n)
        support, query = [], []
        for label in classes:
            picked = self.rng.sample(rows[label], self.k_shot + self.q_query)
            support += picked[: self.k_shot]
            query += picked[self.k_shot :]
        data = self.pool[task]
        return Episode(
            task,
            classes,
            label_ids(data.select(support), classes),
            label_ids(data.select(query), classes),
        )
