"""Where a few-shot run's tasks come from: LEOPARD and the GLUE-style pool, or the user's own tasks.

`fewshot_data` picks the source from the config. Both answer the same four questions, so the
runner, `FewShotResources` and meta-training never ask which they have:

- ``episode(task, k, episode)``: a target's k-shot training episode (``text_a``, ``text_b``, ``label``);
- ``test(task)``: its whole test set (the resources sub-sample it as configured);
- ``pool_split(task, split)``: a pool task's ``"train"`` or ``"dev"`` split (``None``: it has none);
- ``check()``: refuse, with one line, a task or file that will not work, before anything runs.

`LeopardData` reads LEOPARD's official episodes and the pool's JSON files. `OwnTaskData` reads the
tasks of a task file (`metakit.experiments.fewshot.task_config`): each target's episodes are drawn by
`metakit.experiments.data.kshot` (seeded, stratified), its test set is given or held out, and
``record(task)`` is what the run writes to ``episodes/{task}.json`` so that it can be repeated and checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from datasets import Dataset

from metakit.experiments.data.glue_meta import load_glue_meta
from metakit.experiments.data.kshot import held_out_split, kshot_episode, kshot_shortfall
from metakit.experiments.data.leopard import leopard_labels, load_leopard_episode, load_leopard_test
from metakit.experiments.data.text_tasks import TaskDataError, content_digest
from metakit.experiments.fewshot.task_config import TaskConfig, TaskSource

if TYPE_CHECKING:
    from metakit.experiments.fewshot.config import FewShotConfig

__all__ = ["FewShotData", "LeopardData", "OwnTaskData", "TargetData", "fewshot_data"]


class FewShotData(Protocol):
    """The tasks of a few-shot run (see the module's docstring)."""

    def check(self) -> None: ...
    def episode(self, task: str, k: int, episode: int) -> Dataset: ...
    def test(self, task: str) -> Dataset: ...
    def pool_split(self, task: str, split: str) -> Dataset | None: ...


def fewshot_data(config: FewShotConfig) -> FewShotData:
    """`OwnTaskData` when the config has a task file's tasks (``own_tasks``), else `LeopardData`."""
    return OwnTaskData(config) if config.own_tasks is not None else LeopardData(config)


class LeopardData:
    """LEOPARD's targets with their official episodes, and the GLUE-style pool."""

    def __init__(self, config: FewShotConfig):
        self.config = config

    def check(self) -> None:
        """Every selected LEOPARD task's folder and test file is there."""
        for task in self.config.tasks:
            leopard_labels(task, self.config.leopard_dir)

    def episode(self, task: str, k: int, episode: int) -> Dataset:
        """The official episode (raises `EmptyEpisodeError` for an empty upstream file)."""
        return load_leopard_episode(task, k, episode, self.config.leopard_dir)

    def test(self, task: str) -> Dataset:
        """The task's whole test set."""
        return load_leopard_test(task, self.config.leopard_dir)

    def pool_split(self, task: str, split: str) -> Dataset | None:
        """A pool task's ``train`` or ``dev`` split (every pool task has both)."""
        return load_glue_meta(task, split, self.config.pool_dir)


@dataclass
class TargetData:
    """A target of a task file, split.

    Attributes:
        data: the task's examples (its ``split``), in the source's order.
        train_rows: the rows of ``data`` episodes are drawn from (all of them when the test set is given).
        test: the test set.
        test_rows: the rows of ``data`` held out as ``test`` (``None``: the test set is given).
    """

    data: Dataset
    train_rows: list[int]
    test: Dataset
    test_rows: list[int] | None


class OwnTaskData:
    """The pool and targets of a task file (the config's ``own_tasks``), loaded on first use."""

    def __init__(self, config: FewShotConfig):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # a "Generating train split" bar per file drowns the run's own
        self.config = config
        self.tasks = TaskConfig.from_dict(config.own_tasks)
        self._targets: dict[str, TargetData] = {}
        self._pool: dict[tuple[str, str], Dataset | None] = {}

    # -- targets -----------------------------------------------------------------------------------
    def target(self, task: str) -> TargetData:
        """The target's examples and test set, checked against the config's largest k."""
        if task not in self._targets:
            self._targets[task] = self._split(self.tasks.target(task))
        return self._targets[task]

    def _split(self, source: TaskSource) -> TargetData:
        data = source.load("train")
        labels = list(data["label"])
        _at_least_two_classes(source, labels)
        classes = sorted(set(labels))
        if len(classes) > self.config.max_classes:
            raise TaskDataError(
                f"Task {source.name!r} has {len(classes)} classes, more than max_classes="
                f"{self.config.max_classes}; raise it (--set max_classes={len(classes)})."
            )
        k = max(self.config.shots)
        short = kshot_shortfall(labels, k, source.held_out)
        if short is not None:
            raise TaskDataError(_shortfall_message(source, k, *short))
        if source.held_out is None:
            test = source.load("test")
            return TargetData(data, list(range(len(data))), test, None)
        train_rows, test_rows = held_out_split(labels, source.held_out, self.tasks.seed, source.name)
        return TargetData(data, train_rows, data.select(test_rows), test_rows)

    def episode_rows(self, task: str, k: int, episode: int) -> list[int]:
        """The rows of the target's data in its k-shot episode ``episode`` (seeded, k per class)."""
        target = self.target(task)
        labels = [target.data["label"][i] for i in target.train_rows]
        picked = kshot_episode(labels, k, episode, self.tasks.seed, task)
        return [target.train_rows[i] for i in picked]

    def episode(self, task: str, k: int, episode: int) -> Dataset:
        """The target's k-shot episode ``episode``."""
        return self.target(task).data.select(self.episode_rows(task, k, episode))

    def test(self, task: str) -> Dataset:
        """The target's test set (given, or held out)."""
        return self.target(task).test

    # -- pool --------------------------------------------------------------------------------------
    def pool_split(self, task: str, split: str) -> Dataset | None:
        """A pool task's examples (``"train"``) or its dev set (``"dev"``; ``None`` if it names none)."""
        key = (task, split)
        if key not in self._pool:
            source = self.tasks.pool_task(task)
            data = source.load("train" if split == "train" else "dev")
            if split == "train":
                _at_least_two_classes(source, list(data["label"]))
            self._pool[key] = data
        return self._pool[key]

    def check_pool(self, per_class: int) -> None:
        """Every label of every selected pool task has ``per_class`` (k_shot + q_query) examples."""
        for task in self.config.pool_tasks:
            counts = Counter(self.pool_split(task, "train")["label"])
            label = min(sorted(counts), key=lambda lab: counts[lab])
            if counts[label] < per_class:
                raise TaskDataError(
                    f"Pool task {task!r}: label {label!r} has {counts[label]} examples, fewer than the "
                    f"k_shot + q_query = {per_class} a meta-training episode draws of each class; lower them "
                    f"(e.g. --set k_shot={max(1, counts[label] // 2)} --set q_query="
                    f"{max(0, counts[label] - max(1, counts[label] // 2))}), add examples or leave the task out."
                )

    # -- checks and records ------------------------------------------------------------------------
    def check(self) -> None:
        """Load and check every selected target (columns, classes, enough examples for the largest k)."""
        for task in self.config.tasks:
            self.target(task)

    def record(self, task: str) -> dict[str, Any]:
        """What a run writes to ``episodes/{task}.json``: the source, digests, test rows and every
        selected episode's rows and labels (rows index the task's data)."""
        target = self.target(task)
        source = self.tasks.target(task)
        labels = target.data["label"]
        episodes: dict[str, dict[str, Any]] = {}
        for k in self.config.shots:
            for number in self.config.episodes:
                rows = self.episode_rows(task, k, number)
                episodes.setdefault(str(k), {})[str(number)] = {
                    "rows": rows,
                    "labels": [labels[i] for i in rows],
                }
        if target.test_rows is None:
            test = {"given": True, "examples": len(target.test), "sha256": content_digest(target.test)}
        else:
            test = {"held_out": source.held_out, "examples": len(target.test_rows), "rows": target.test_rows}
        return {
            "task": task,
            "seed": self.tasks.seed,
            "source": source.to_dict(),
            "examples": len(target.data),
            "sha256": content_digest(target.data),
            "test": test,
            "episodes": episodes,
        }


def _at_least_two_classes(source: TaskSource, labels: list[str]) -> None:
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise TaskDataError(
            f"Task {source.name!r} has one class ({classes[0]!r}) in label column {source.label!r}; a "
            "classification task needs at least two."
        )


def _shortfall_message(source: TaskSource, k: int, label: str, count: int, need: int, works: int) -> str:
    if source.held_out is None:
        need_text = f"fewer than k={k}"
    else:
        need_text = (
            f"fewer than the {need} that k={k} needs ({k} for the episodes + {need - k} held out for the "
            f"test at test_size={source.held_out})"
        )
    fix = (
        f"k <= {works} works with this data (--shots {works})" if works >= 1 else "no k works with this data"
    )
    more = "" if source.held_out is None else ", give a test file or lower test_size"
    return f"Task {source.name!r}: label {label!r} has {count} examples, {need_text}; {fix}{more}, or add examples."
