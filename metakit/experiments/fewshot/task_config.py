"""Your own few-shot tasks: a TOML or YAML file naming meta-training tasks (``pool``) and evaluation
tasks (``targets``), each a labelled text data set read by `load_text_classification`.

A task gives ``path`` (a local file or folder; relative paths are relative to the task file) or
``hub`` (a Hugging Face hub data set, with ``config`` and ``split``), its ``text`` column (or two, for
sentence pairs) and its ``label`` column. A target's test set is ``test`` (a file), ``test_split`` (a
split of the same data set) or, with neither, a seeded share ``test_size`` of every class held out
(default 0.5). A pool task may name a ``dev`` file or ``dev_split``: meta-training reports its query
loss on episodes of those. ``seed`` (default 0) seeds the held-out splits and the k-shot episodes.

Example file (``metakit fewshot run --task-config tasks.toml``)::

    [[pool]]
    path = "smart_home.csv"        # name: the file's stem, "smart_home"
    label = "intent"

    [[pool]]
    name = "news"
    path = "news/headlines.jsonl"
    text = "headline"
    label = "topic"

    [[targets]]
    name = "tickets"
    path = "tickets/train.csv"
    test = "tickets/test.csv"
    text = "message"
    label = "team"

Example:
    >>> tasks = read_task_config("examples/own-tasks/tasks.toml")  # doctest: +SKIP
    >>> [t.name for t in tasks.pool], [t.name for t in tasks.targets]  # doctest: +SKIP
    (['smart_home', 'news', 'reviews'], ['tickets'])
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

from metakit.experiments.config import read_config_file
from metakit.experiments.data.text_tasks import load_text_classification

__all__ = ["DEFAULT_TEST_SIZE", "TaskConfig", "TaskSource", "read_task_config", "task_config_differences"]

#: The share of every class a target without a test set holds out for it.
DEFAULT_TEST_SIZE = 0.5
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PATH_KEYS = ("path", "test", "dev")


@dataclass(frozen=True)
class TaskSource:
    """Where one task's examples are and which columns hold its texts and labels.

    Attributes:
        name: the task's name in configs, results and file names (letters, digits, ``_ . -``).
        path: a local file or folder (absolute once read from a task file); or ``hub``: a hub data set.
        config, split: the hub configuration and the split the task's examples come from.
        text: one text column, or two for a sentence pair; label: the label column.
        test, test_split: a target's test set (a file, or a split of the same data set); with neither, a
            seeded share ``test_size`` of every class is held out of the task's examples.
        dev, dev_split: a pool task's dev set (a file or a split), for meta-training's dev loss.
    """

    name: str
    path: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    text: list[str] = field(default_factory=lambda: ["text"])
    label: str = "label"
    test: str | None = None
    test_split: str | None = None
    test_size: float | None = None
    dev: str | None = None
    dev_split: str | None = None

    def load(self, which: Literal["train", "test", "dev"] = "train") -> Dataset | None:
        """The task's examples (``"train"``), its given test or dev set (``None`` when it has none)."""
        where = f"Task {self.name!r}" + ("" if which == "train" else f" ({which} set)")
        columns = {"text": self.text, "label": self.label, "name": where}
        if which == "train":
            file, split = None, self.split
        else:
            file, split = (self.test, self.test_split) if which == "test" else (self.dev, self.dev_split)
            if file is not None:
                return load_text_classification(file, from_hub=False, **columns)
            if split is None:
                return None
        if self.hub is not None:
            return load_text_classification(
                self.hub, config=self.config, split=split, from_hub=True, **columns
            )
        return load_text_classification(self.path, split=split, from_hub=False, **columns)

    @property
    def held_out(self) -> float | None:
        """The share of every class held out for the test (``None`` when the test set is given)."""
        if self.test is not None or self.test_split is not None:
            return None
        return self.test_size if self.test_size is not None else DEFAULT_TEST_SIZE

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready keys (the form a task file's entries take)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaskConfig:
    """The tasks of a task file: ``pool`` (meta-training) and ``targets`` (evaluation), and the ``seed``
    of the targets' held-out splits and episodes."""

    pool: list[TaskSource]
    targets: list[TaskSource]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("The task config names no targets; add at least one [[targets]] entry.")
        seen: dict[str, str] = {}
        for section, tasks in (("pool", self.pool), ("targets", self.targets)):
            for number, task in enumerate(tasks, 1):
                where = f"{section} #{number}"
                if task.name in seen:
                    raise ValueError(
                        f"Task name {task.name!r} is used twice ({seen[task.name]} and {where}); names must be "
                        'unique: set name = "..." on one of them.'
                    )
                seen[task.name] = where

    @property
    def names(self) -> dict[str, list[str]]:
        """``{"pool": [...], "targets": [...]}``, in the file's order."""
        return {"pool": [t.name for t in self.pool], "targets": [t.name for t in self.targets]}

    def target(self, name: str) -> TaskSource:
        """The target called ``name``."""
        return _by_name(self.targets, name, "targets")

    def pool_task(self, name: str) -> TaskSource:
        """The pool task called ``name``."""
        return _by_name(self.pool, name, "pool")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content (what a run's ``config.json`` records under ``own_tasks``)."""
        return {
            "seed": self.seed,
            "pool": [t.to_dict() for t in self.pool],
            "targets": [t.to_dict() for t in self.targets],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: str | os.PathLike | None = None) -> TaskConfig:
        """Check and build a task config from a task file's keys (relative paths resolved against ``base``)."""
        if not isinstance(data, dict):
            raise ValueError(f"A task config is a table with pool and targets, got {type(data).__name__}.")
        unknown = sorted(set(data) - {"pool", "targets", "seed"})
        if unknown:
            raise ValueError(f"Unknown task-config keys {unknown}; a task config has pool, targets and seed.")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        sections = {}
        for section in ("pool", "targets"):
            entries = data.get(section, [])
            if not isinstance(entries, list):
                raise ValueError(
                    f"{section} must be a list of tasks ([[{section}]] tables in TOML, '- path: ...' items in "
                    f"YAML), got {type(entries).__name__}."
                )
            sections[section] = [
                _source(entry, section, number, base) for number, entry in enumerate(entries, 1)
            ]
        return cls(sections["pool"], sections["targets"], seed)


def read_task_config(path: str | os.PathLike) -> TaskConfig:
    """Read a ``.toml`` or ``.yaml`` task file; ``path``, ``test`` and ``dev`` become absolute paths.

    Raises:
        FileNotFoundError: the file does not exist; ValueError: a bad key or value (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task config {str(path)!r} does not exist; give a .toml or .yaml task file.")
    keys = read_config_file(path)
    try:
        return TaskConfig.from_dict(keys, base=path.resolve().parent)
    except ValueError as error:
        raise ValueError(f"Task config {str(path)!r}: {error}") from None


def task_config_differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Dotted names of what differs between two ``own_tasks`` records (``own_tasks.targets.tickets.path``)."""
    if (saved is None) != (current is None):
        return ["own_tasks (one run has a task config, the other LEOPARD's tasks)"]
    if saved is None:
        return []
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            out.append(f"own_tasks.{key} (added)")
        elif key not in b:
            out.append(f"own_tasks.{key} (removed)")
        elif a[key] != b[key]:
            out.append(f"own_tasks.{key}")
    return out


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {"seed": record.get("seed", 0)}
    for section in ("pool", "targets"):
        for task in record.get(section, []):
            flat[f"{section}.{task['name']}"] = True
            for key, value in task.items():
                if key != "name":
                    flat[f"{section}.{task['name']}.{key}"] = value
    return flat


def _by_name(tasks: list[TaskSource], name: str, section: str) -> TaskSource:
    for task in tasks:
        if task.name == name:
            return task
    raise ValueError(f"{name!r} is not among the task config's {section} {[t.name for t in tasks]}.")


def _source(entry: Any, section: str, number: int, base: str | os.PathLike | None) -> TaskSource:
    where = f"{section} #{number}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a table of keys (path, text, label, ...), got {entry!r:.60}.")
    known = {f.name for f in dataclasses.fields(TaskSource)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a task has {sorted(known)}.")
    keys = dict(entry)
    if (keys.get("path") is None) == (keys.get("hub") is None):
        raise ValueError(
            f"{where}: give exactly one of path (a local file or folder) and hub (a hub data set)."
        )
    if section == "pool" and any(keys.get(k) is not None for k in ("test", "test_split", "test_size")):
        raise ValueError(
            f"{where}: a pool task has no test set (test, test_split, test_size are for targets)."
        )
    if section == "targets" and any(keys.get(k) is not None for k in ("dev", "dev_split")):
        raise ValueError(
            f"{where}: dev and dev_split are for pool tasks; a target's test set is test or test_split."
        )
    for a, b in (("test", "test_split"), ("dev", "dev_split")):
        if keys.get(a) is not None and keys.get(b) is not None:
            raise ValueError(f"{where}: give {a} (a file) or {b} (a split of the same data set), not both.")
    if keys.get("test_size") is not None and (keys.get("test") or keys.get("test_split")):
        raise ValueError(
            f"{where}: test_size holds out part of the data; it cannot go with test or test_split."
        )
    size = keys.get("test_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, float | int) or not 0 < size < 1):
        raise ValueError(
            f"{where}: test_size is the share of every class held out for the test, in (0, 1); got {size!r}."
        )
    if isinstance(keys.get("text"), str):
        keys["text"] = [keys["text"]]
    text = keys.get("text", ["text"])
    if (
        not isinstance(text, list)
        or not 1 <= len(text) <= 2
        or not all(isinstance(c, str) and c for c in text)
    ):
        raise ValueError(
            f'{where}: text names one column or two (a pair), e.g. "text" or ["premise", "hypothesis"]; got {text!r}.'
        )
    for key in ("name", "path", "hub", "config", "split", "label", "test", "test_split", "dev", "dev_split"):
        if keys.get(key) is not None and not isinstance(keys[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {keys[key]!r}.")
    for key in _PATH_KEYS:
        if keys.get(key) is not None and base is not None:
            keys[key] = str((Path(base) / Path(keys[key]).expanduser()).resolve())
    if keys.get("name") is None:
        keys["name"] = _default_name(keys)
    if not _NAME.fullmatch(keys["name"]):
        raise ValueError(
            f"{where}: task name {keys['name']!r} must be letters, digits, '_', '.' or '-' (it names files); "
            'set name = "...".'
        )
    return TaskSource(**keys)


def _default_name(keys: dict[str, Any]) -> str:
    if keys.get("path") is not None:
        path = Path(keys["path"])
        if not path.suffix:
            return path.name
        # tickets/train.csv is the task "tickets", not "train"
        return path.parent.name if path.stem in ("train", "data") and path.parent.name else path.stem
    name = keys["hub"].rstrip("/").split("/")[-1]
    return f"{name}-{keys['config']}" if keys.get("config") else name
