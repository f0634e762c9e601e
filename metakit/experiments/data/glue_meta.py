"""The GLUE-style meta-training pool (fourteen classification tasks) as ``datasets.Dataset``.

Read from local JSON files (``../shared/data/glue-meta/<TASK>/{train,dev}.json``, each an object mapping
an id to ``{"text_a", "text_b" or null, "label"}``). Labels become strings (some files store ints), so
every pool task has the same features as the LEOPARD tasks (`metakit.experiments.data.leopard.text_features`).

Example:
    >>> pool = load_glue_meta_pool(split="train")  # doctest: +SKIP
    >>> sorted(set(pool["MNLI"]["label"]))  # doctest: +SKIP
    ['contradiction', 'entailment', 'neutral']
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import Dataset

from metakit.experiments.data.leopard import read_json, text_features
from metakit.experiments.data.locate import development_folder, locate

__all__ = ["DEFAULT_GLUE_META_DIR", "GLUE_META_TASKS", "load_glue_meta", "load_glue_meta_pool"]

#: ``../shared/data/glue-meta`` beside the repository root.
DEFAULT_GLUE_META_DIR = str(development_folder("glue-meta"))

#: Task name → (training examples, whether it is a sentence-pair task), as in the data's README.
GLUE_META_TASKS: dict[str, tuple[int, bool]] = {
    "CoLA": (7695, False),
    "MNLI": (8999, True),
    "MRPC": (3300, True),
    "QNLI": (8999, True),
    "QQP": (8999, True),
    "RTE": (2240, True),
    "SNLI": (8999, True),
    "SST-2": (6227, False),
    "cr": (1597, False),
    "mpqa": (7742, False),
    "mr": (7795, False),
    "sst-5": (7689, False),
    "subj": (7200, False),
    "trec": (4906, False),
}
_SPLITS = ("train", "dev")


def load_glue_meta(task: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    """One pool task's ``train`` or ``dev`` split, rows in the file's order."""
    if task not in GLUE_META_TASKS:
        raise ValueError(f"Unknown meta-training task {task!r}; the pool holds {sorted(GLUE_META_TASKS)}.")
    if split not in _SPLITS:
        raise ValueError(
            f"Unknown split {split!r} of the meta-training pool; expected one of {list(_SPLITS)}."
        )
    root = locate(
        "glue-meta",
        data_dir,
        label="Meta-training (GLUE-style pool)",
        expected="a folder that holds CoLA/, MNLI/, ...",
        how="metakit fewshot: --set pool_dir=DIR; in code: data_dir=",
    )
    path = root / task / f"{split}.json"
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"Meta-training file {str(path)!r} is missing; {str(root)!r} holds {present}."
        )
    records = read_json(path)
    if not isinstance(records, dict):
        raise ValueError(
            f"{path} must hold a JSON object mapping ids to examples, found {type(records).__name__}."
        )
    rows = []
    for key, record in records.items():
        if not isinstance(record, dict) or "text_a" not in record or "label" not in record:
            raise ValueError(
                f"{path}: example {key!r} lacks 'text_a' or 'label'; restore the file from the source."
            )
        rows.append(
            {"text_a": record["text_a"], "text_b": record.get("text_b"), "label": str(record["label"])}
        )
    return Dataset.from_list(rows, features=text_features())


def load_glue_meta_pool(
    tasks: Sequence[str] | None = None, split: str = "train", data_dir: str | os.PathLike | None = None
) -> dict[str, Dataset]:
    """Several pool tasks' ``split`` by name (default: all fourteen)."""
    return {task: load_glue_meta(task, split, data_dir) for task in (tasks or list(GLUE_META_TASKS))}
