"""The LEOPARD few-shot target tasks (Bansal, Jha, McCallum, COLING 2020) as ``datasets.Dataset``.

Twelve of LEOPARD's seventeen tasks, read from local JSON files (``../shared/data/leopard``): per task
the official k-shot training episodes (k ∈ {4, 8, 16}, episodes 0–9) and the test set. Every example
becomes ``{"text_a": str, "text_b": str or None, "label": str}``; ``text_b`` holds the second sentence
of the pair tasks (conll's entity span, restaurant's slot, scitail's hypothesis).

Example:
    >>> support = load_leopard_episode("scitail", k=8, episode=0)  # doctest: +SKIP
    >>> len(support), support.column_names  # doctest: +SKIP
    (16, ['text_a', 'text_b', 'label'])
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value

from metakit.experiments.data.locate import development_folder, locate

__all__ = [
    "DEFAULT_LEOPARD_DIR",
    "LEOPARD_EPISODES",
    "LEOPARD_MISSING",
    "LEOPARD_SHOTS",
    "LEOPARD_TASKS",
    "EmptyEpisodeError",
    "LeopardTask",
    "leopard_episodes",
    "leopard_labels",
    "load_leopard_episode",
    "load_leopard_test",
    "read_json",
    "stratified_subsample",
    "text_features",
]

logger = logging.getLogger(__name__)

#: ``../shared/data/leopard`` beside the repository root: the last place `locate` looks.
DEFAULT_LEOPARD_DIR = str(development_folder("leopard"))
LEOPARD_SHOTS = (4, 8, 16)
LEOPARD_EPISODES = 10
#: LEOPARD tasks whose test sets are missing or truncated in the only public copy.
LEOPARD_MISSING = ("emotion", "rating_dvd", "rating_electronics", "rating_kitchen", "sentiment_electronics")


@dataclass(frozen=True)
class LeopardTask:
    """One LEOPARD task: its folder, its files' prefix, classes, test size and whether it is a pair task."""

    name: str
    n_classes: int
    test_size: int
    pair: bool = False
    prefix: str = ""

    @property
    def file_prefix(self) -> str:
        """The prefix of the task's file names (``conll_c`` for conll)."""
        return self.prefix or self.name


#: The twelve tasks, with the class counts and test sizes of the data's README.
LEOPARD_TASKS: dict[str, LeopardTask] = {
    t.name: t
    for t in (
        LeopardTask("airline", 3, 7320),
        LeopardTask("conll", 4, 5648, pair=True, prefix="conll_c"),
        LeopardTask("disaster", 2, 5430),
        LeopardTask("political_audience", 2, 1034),
        LeopardTask("political_bias", 2, 1346),
        LeopardTask("political_message", 9, 450),
        LeopardTask("rating_books", 3, 1391),
        LeopardTask("restaurant", 8, 2591, pair=True),
        LeopardTask("scitail", 2, 2126, pair=True),
        LeopardTask("sentiment_books", 2, 1000),
        LeopardTask("sentiment_dvd", 2, 1000),
        LeopardTask("sentiment_kitchen", 2, 1000),
    )
}


class EmptyEpisodeError(ValueError):
    """A training-episode file that holds no example (upstream's ``disaster_train_0_16.json``)."""


def text_features() -> Features:
    """The features of every few-shot classification dataset: ``text_a``, ``text_b`` (or None), ``label``."""
    return Features({"text_a": Value("string"), "text_b": Value("string"), "label": Value("string")})


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a corrupted one raises one ``ValueError`` line naming the file and the place."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "restore it from the source (`sha256sum -c SHA256SUMS` in its folder finds damaged files)."
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}); restore it from the source.") from None


def _task(name: str) -> LeopardTask:
    if name not in LEOPARD_TASKS:
        hint = " (it is one of the five not in the public copy)" if name in LEOPARD_MISSING else ""
        raise ValueError(f"Unknown LEOPARD task {name!r}{hint}; the tasks here are {sorted(LEOPARD_TASKS)}.")
    return LEOPARD_TASKS[name]


def _folder(data_dir: str | os.PathLike | None, task: LeopardTask) -> Path:
    root = locate(
        "leopard",
        data_dir,
        label="LEOPARD",
        expected="a folder that holds airline/, conll/, ...",
        how="metakit fewshot: --set leopard_dir=DIR; in code: data_dir=",
    )
    folder = root / task.name
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"LEOPARD task folder {str(folder)!r} is missing; {str(root)!r} holds {present}."
        )
    return folder


def _rows(records: Any, path: Path, pair: bool) -> list[dict[str, str | None]]:
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of examples, found {type(records).__name__}.")
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "sentence1" not in record or "label" not in record:
            raise ValueError(
                f"{path}: example {index} lacks 'sentence1' or 'label' (found {record!r:.80}); "
                "restore the file from the source."
            )
        text_b = record.get("sentence2") if pair else None
        if pair and text_b is None:
            raise ValueError(f"{path}: example {index} of a pair task lacks 'sentence2'.")
        rows.append({"text_a": record["sentence1"], "text_b": text_b, "label": str(record["label"])})
    return rows


def _check_shots(k: int, episode: int) -> None:
    if k not in LEOPARD_SHOTS:
        raise ValueError(f"LEOPARD episodes have k in {list(LEOPARD_SHOTS)} examples per class, got k={k!r}.")
    if not 0 <= episode < LEOPARD_EPISODES:
        raise ValueError(f"LEOPARD episodes are numbered 0..{LEOPARD_EPISODES - 1}, got episode={episode!r}.")


def load_leopard_episode(
    task: str, k: int, episode: int, data_dir: str | os.PathLike | None = None
) -> Dataset:
    """The official training episode ``episode`` of ``task`` with ``k`` examples per class.

    Raises:
        EmptyEpisodeError: the file holds no example (skip that episode; see `leopard_episodes`).
    """
    spec = _task(task)
    _check_shots(k, episode)
    path = _folder(data_dir, spec) / f"{spec.file_prefix}_train_{episode}_{k}.json"
    if not path.is_file():
        raise FileNotFoundError(f"LEOPARD episode file {str(path)!r} is missing.")
    rows = _rows(read_json(path), path, spec.pair)
    if not rows:
        raise EmptyEpisodeError(
            f"{path} is empty (a known upstream defect of {task} k={k} episode {episode}); skip this episode."
        )
    return Dataset.from_list(rows, features=text_features())


def leopard_episodes(
    task: str, k: int, data_dir: str | os.PathLike | None = None, episodes: Sequence[int] | None = None
) -> dict[int, Dataset]:
    """Every usable training episode of ``task`` at ``k`` shots, by number; empty ones are skipped, logged."""
    chosen = range(LEOPARD_EPISODES) if episodes is None else episodes
    out: dict[int, Dataset] = {}
    for episode in chosen:
        try:
            out[episode] = load_leopard_episode(task, k, episode, data_dir)
        except EmptyEpisodeError as error:
            logger.warning("Skipping a LEOPARD episode: %s", error)
    return out


def load_leopard_test(
    task: str, data_dir: str | os.PathLike | None = None, max_examples: int | None = None, seed: int = 0
) -> Dataset:
    """The test set of ``task``; ``max_examples`` takes a seeded stratified subsample of it."""
    spec = _task(task)
    path = _folder(data_dir, spec) / f"{spec.file_prefix}_eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"LEOPARD test file {str(path)!r} is missing.")
    data = Dataset.from_list(_rows(read_json(path), path, spec.pair), features=text_features())
    return stratified_subsample(data, max_examples, seed) if max_examples is not None else data


def leopard_labels(task: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The sorted label names of ``task``'s test set."""
    return sorted(set(load_leopard_test(task, data_dir)["label"]))


def stratified_subsample(data: Dataset, n: int, seed: int = 0, column: str = "label") -> Dataset:
    """A seeded subsample of ``n`` rows keeping each label's share (largest remainders; order kept).

    Args:
        data: any dataset with a label column.
        n: rows to keep (all of them if ``n >= len(data)``).
        seed: chooses which rows of each label are kept.
    """
    if n < 1:
        raise ValueError(f"A subsample needs n >= 1 rows, got {n}.")
    if n >= len(data):
        return data
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(data[column]):
        by_label[label].append(index)
    exact = {label: n * len(rows) / len(data) for label, rows in by_label.items()}
    take = {label: int(share) for label, share in exact.items()}
    for label in sorted(exact, key=lambda lab: (take[lab] - exact[lab], lab))[: n - sum(take.values())]:
        take[label] += 1
    rng = random.Random(seed)
    kept = [i for label in sorted(by_label) for i in rng.sample(by_label[label], take[label])]
    return data.select(sorted(kept))
