"""``metakit fewshot merge``: join output folders of one config that ran different units side by side.

The ``cpu`` preset runs on one thread, so a 2-core machine can run two invocations at once, each on
its own folder with its own ``--settings`` (or ``--tasks``). Every unit is a pure function of the
config and the meta-trained weights, so units from folders whose result-changing keys are equal belong
in one table. `merge_folders` checks that, refuses a unit present twice, copies the unit files,
TensorBoard logs, checkpoints and a task file's episode records (which must agree), and writes the merged ``config.json``, ``results.json`` and
``table.md``; ``metakit fewshot verify`` then checks the merged folder as any other.

Example:
    >>> merge_folders(["runs/half-a", "runs/half-b"], "runs/cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metakit.experiments.fewshot.config import FEWSHOT_SELECTION_KEYS, FewShotConfig
from metakit.experiments.fewshot.records import EPISODES_DIR, merge_episode_records
from metakit.experiments.fewshot.report import render_fewshot_report
from metakit.experiments.fewshot.runner import fewshot_differing_keys
from metakit.experiments.folder import IGNORED, saved_config
from metakit.experiments.lock import FolderLock
from metakit.experiments.report import ResultsFileError, read_results, write_json

__all__ = ["merge_folders"]


def _unit_key(unit: dict[str, Any]) -> tuple:
    return unit["setting"], unit["task"], unit["k"], unit["episode"]


def _union(values: list[list[Any]], order: Sequence[Any] = ()) -> list[Any]:
    """Every value of ``values``: those in ``order`` first, in its order, then the rest sorted."""
    seen = {value for group in values for value in group}
    return [v for v in order if v in seen] + sorted(seen - set(order))


def merge_folders(sources: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge the few-shot output folders ``sources`` into the new folder ``out_dir``; returns its results.

    Raises:
        ValueError: fewer than two sources, configs that differ in a result-changing key (named), a unit
            or a setting's meta-training found in two sources, or ``out_dir`` already exists.
        ResultsFileError: a source without a readable ``config.json`` or ``results.json``.
    """
    sources = [Path(source) for source in sources]
    out = Path(out_dir)
    if len(sources) < 2:
        raise ValueError("merge needs at least two source folders.")
    if out.exists():
        raise ValueError(f"{str(out)!r} already exists; merge writes a new folder, choose another --out.")
    configs, results = [], []
    for source in sources:
        config = saved_config(source)
        if config is None:
            raise ResultsFileError(
                f"{str(source)!r} has no config.json; is it a `metakit fewshot run` folder?"
            )
        configs.append(config)
        results.append(read_results(source / "results.json"))
    for source, config in zip(sources[1:], configs[1:], strict=True):
        changed = fewshot_differing_keys(config, configs[0])
        if changed:
            raise ValueError(
                f"{str(source)!r} and {str(sources[0])!r} were run with different configs (keys that differ: "
                f"{changed}); only folders of one config can share a table."
            )
    owner: dict[tuple, Path] = {}
    meta_owner: dict[str, Path] = {}
    for source, result in zip(sources, results, strict=True):
        for unit in result["units"]:
            key = _unit_key(unit)
            if key in owner:
                raise ValueError(f"Unit {key} is in both {str(owner[key])!r} and {str(source)!r}.")
            owner[key] = source
        for setting in result.get("meta", {}):
            if setting in meta_owner:
                raise ValueError(
                    f"Setting {setting!r} was meta-trained in both {str(meta_owner[setting])!r} and "
                    f"{str(source)!r}; its units would not share one set of meta-trained weights."
                )
            meta_owner[setting] = source

    merged_config = FewShotConfig(**configs[0]).to_dict()
    default = FewShotConfig()
    for key in FEWSHOT_SELECTION_KEYS:
        if key == "tasks" and merged_config.get("own_tasks") is not None:
            order = [task["name"] for task in merged_config["own_tasks"]["targets"]]
        else:
            order = getattr(default, key) if key != "episodes" else ()
        merged_config[key] = _union([config[key] for config in configs], order)
    records = _episode_records(sources)
    out.mkdir(parents=True)
    lock = FolderLock(out)
    lock.acquire()
    try:
        for source in sources:
            for sub in ("runs", "tensorboard", "checkpoints"):
                if (source / sub).is_dir():
                    shutil.copytree(source / sub, out / sub, dirs_exist_ok=True)
        for task, record in records.items():
            (out / EPISODES_DIR).mkdir(exist_ok=True)
            write_json(out / EPISODES_DIR / f"{task}.json", record)
        merged = {
            "units": [unit for result in results for unit in result["units"]],
            "meta": {k: v for result in results for k, v in result.get("meta", {}).items()},
            "skipped": [list(s) for s in sorted({tuple(s) for r in results for s in r.get("skipped", [])})],
            "elapsed_seconds": sum(result.get("elapsed_seconds", 0.0) for result in results),
            "config": merged_config,
            "environment": results[0].get("environment"),
            "invocations": [
                {**call, "folder": source.name}
                for source, result in zip(sources, results, strict=True)
                for call in result.get("invocations", [])
            ],
            "merged_from": [source.name for source in sources],
        }
        (out / ".gitignore").write_text(IGNORED, encoding="utf-8")
        fingerprint = FewShotConfig(**merged_config).fingerprint()
        write_json(out / "config.json", {"fingerprint": fingerprint, "config": merged_config})
        write_json(out / "results.json", merged)
        (out / "table.md").write_text(render_fewshot_report(merged), encoding="utf-8")
    finally:
        lock.release()
    return json.loads(json.dumps(merged))


def _episode_records(sources: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """The task-file targets' episode records of every source, one per task (refused if they disagree)."""
    records: dict[str, dict[str, Any]] = {}
    for source in sources:
        folder = source / EPISODES_DIR
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{str(path)!r} is not a readable episode record ({error}).") from None
            task = path.stem
            records[task] = (
                merge_episode_records(records[task], record, str(path)) if task in records else record
            )
    return records
