"""The episodes of a task file's targets, recorded in the output folder: ``episodes/{task}.json``.

LEOPARD's episodes are files anyone can read; a user's own targets get seeded episodes instead
(`metakit.experiments.fewshot.sources.OwnTaskData`), and the run writes down what they were: the
task's source, a SHA-256 of its examples, its held-out test rows (or the given test set's SHA-256)
and, for every k and episode, the rows and labels of the support set. A resumed run draws the
episodes again and refuses to go on if they, or the data, differ from the record; ``metakit fewshot
verify`` checks every unit against it (the unit's classes, k examples of each in its episode).

Example:
    >>> write_episode_records("runs/own", OwnTaskData(config))  # doctest: +SKIP
    >>> check_episode_records("runs/own", results["units"])  # doctest: +SKIP
    []
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metakit.experiments.fewshot.sources import OwnTaskData
from metakit.experiments.report import write_json

__all__ = ["EPISODES_DIR", "check_episode_records", "merge_episode_records", "write_episode_records"]

#: The output folder's sub-folder of episode records.
EPISODES_DIR = "episodes"


def write_episode_records(out_dir: str | Path, data: OwnTaskData) -> None:
    """Write (or extend) the record of every selected target; a record that disagrees is refused.

    Raises:
        ValueError: a target's data, test set or an episode differs from the one recorded (one line).
    """
    folder = Path(out_dir) / EPISODES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for task in data.config.tasks:
        path = folder / f"{task}.json"
        record = data.record(task)
        if path.is_file():
            record = merge_episode_records(_read(path), record, where=str(path))
        write_json(path, record)


def merge_episode_records(saved: dict[str, Any], new: dict[str, Any], where: str) -> dict[str, Any]:
    """``saved`` with ``new``'s episodes added; raises ``ValueError`` if they disagree on anything shared."""
    task = saved.get("task")
    hint = "restore the data as it was, or start a new --out"
    if saved.get("sha256") != new["sha256"] or saved.get("examples") != new["examples"]:
        raise ValueError(
            f"Task {task!r}'s examples changed since the run began ({where} records {saved.get('examples')} "
            f"examples with another SHA-256 than the {new['examples']} there are now); {hint}."
        )
    if saved.get("test") != new["test"]:
        raise ValueError(f"Task {task!r}'s test set changed since the run began ({where}); {hint}.")
    episodes = {k: dict(v) for k, v in saved.get("episodes", {}).items()}
    for k, numbered in new["episodes"].items():
        for number, episode in numbered.items():
            known = episodes.get(k, {}).get(number)
            if known is not None and known != episode:
                raise ValueError(
                    f"Task {task!r} k={k} episode {number} draws other rows than {where} records (another "
                    f"seed or version of the data?); {hint}."
                )
            episodes.setdefault(k, {})[number] = episode
    return {
        **saved,
        "episodes": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in episodes.items()},
    }


def check_episode_records(out_dir: str | Path, units: Sequence[dict[str, Any]]) -> list[str]:
    """One line per unit its folder's episode record contradicts (or that has none)."""
    folder = Path(out_dir) / EPISODES_DIR
    records: dict[str, dict[str, Any] | None] = {}
    problems = []
    for unit in units:
        task, k, number = unit["task"], unit["k"], unit["episode"]
        name = f"{unit['setting']} {task} k={k} episode {number}"
        if task not in records:
            path = folder / f"{task}.json"
            try:
                records[task] = _read(path) if path.is_file() else None
            except ValueError as error:
                records[task] = None
                problems.append(f"{name}: {error}")
                continue
        record = records[task]
        if record is None:
            problems.append(f"{name}: no episode record {EPISODES_DIR}/{task}.json in {out_dir}.")
            continue
        episode = record.get("episodes", {}).get(str(k), {}).get(str(number))
        if episode is None:
            problems.append(f"{name}: {EPISODES_DIR}/{task}.json records no such episode.")
            continue
        counts = Counter(episode["labels"])
        if sorted(counts) != sorted(unit["classes"]) or set(counts.values()) != {k}:
            problems.append(
                f"{name}: the recorded episode has {dict(sorted(counts.items()))}, not {k} examples of each "
                f"of the unit's classes {unit['classes']}."
            )
        if len(set(episode["rows"])) != len(episode["rows"]) or len(episode["rows"]) != len(
            episode["labels"]
        ):
            problems.append(f"{name}: the recorded episode repeats a row or lacks a label.")
        held_out = set(record.get("test", {}).get("rows") or [])
        if held_out & set(episode["rows"]):
            problems.append(f"{name}: the recorded episode uses rows held out for the test.")
    return problems


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a readable episode record ({error}).") from None
