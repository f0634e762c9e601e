"""Runs the units of the few-shot experiment — (setting, task, k, episode) — and keeps the output folder current.

Layout of the output folder (the same machinery as ``metakit ner``: `open_folder`)::

    config.json          the full config and its fingerprint (a resumed run must match it)
    results.json         every finished unit (accuracy, macro-F1, timings), meta-training logs, skipped episodes
    table.md             per-task mean ± std per setting and the paired comparisons, rewritten after every unit
    runs/{setting}/{task}-k{k}-ep{episode}.jsonl.gz   the unit's result, then one line per test example
    .lock                held (``flock``) by the process writing the folder
    tensorboard/         meta-{setting} (meta-training losses), ft-{setting} (fine-tuning losses, test scores)
    checkpoints/         meta-{setting}.pt, the meta-trained weights (git-ignored)
    episodes/{task}.json with a task file's targets (``own_tasks``): the seeded episodes and test split
                         drawn for each target (`metakit.experiments.fewshot.records`)

A unit's result and predictions are written together in one file with one rename, and only then added
to ``results.json``; ``metakit fewshot verify`` recomputes every accuracy and macro-F1 from those files.
Every unit is a pure function of the config and the meta-trained weights, so a resumed run gives the
results an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from metakit.experiments.config import differing_keys
from metakit.experiments.data.episodes import FewShotSampler
from metakit.experiments.data.leopard import stratified_subsample
from metakit.experiments.fewshot.config import FEWSHOT_SELECTION_KEYS, FewShotConfig
from metakit.experiments.fewshot.records import write_episode_records
from metakit.experiments.fewshot.report import render_fewshot_report
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.fewshot.sources import OwnTaskData, fewshot_data
from metakit.experiments.fewshot.task_config import task_config_differences
from metakit.experiments.fewshot.unit import DATA_SEED, FewShotResources, fewshot_units, run_unit
from metakit.experiments.folder import open_folder
from metakit.experiments.model import check_model
from metakit.experiments.report import environment, save_rows, write_json

__all__ = ["FewShotExperiment", "fewshot_differing_keys", "unit_path"]


def fewshot_differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Result-changing keys in which a saved few-shot config differs from ``current``; a task file's
    tasks are compared entry by entry (``own_tasks.targets.tickets.path``)."""
    keys = differing_keys(saved, current, FewShotConfig().to_dict(), FEWSHOT_SELECTION_KEYS)
    if "own_tasks" in keys:
        index = keys.index("own_tasks")
        detail = task_config_differences(saved.get("own_tasks"), current.get("own_tasks"))
        keys[index : index + 1] = detail or ["own_tasks"]
    return keys


def unit_path(setting: str, task: str, k: int, episode: int) -> str:
    """Where a unit's predictions go, relative to the output folder."""
    return f"runs/{setting}/{task}-k{k}-ep{episode}.jsonl.gz"


class FewShotExperiment:
    """The few-shot experiment on one output folder, which it locks until `close`.

    Args:
        config: what to run.
        out_dir: where results, predictions, logs and checkpoints go.
        resume: continue a folder that already holds results (every key that changes results must match).

    Example:
        >>> with FewShotExperiment(load_fewshot_config("tiny"), "runs/tiny") as experiment:  # doctest: +SKIP
        ...     experiment.run()
    """

    def __init__(self, config: FewShotConfig, out_dir: str | Path, resume: bool = False):
        self.config, self.out = config, Path(out_dir)
        self.activity = "starting"
        self.data = fewshot_data(config)
        self._check_inputs()  # before anything is written, so a failed start leaves no folder behind
        self.lock, self.results = open_folder(
            self.out,
            config.to_dict(),
            config.fingerprint(),
            differing=lambda saved: fewshot_differing_keys(saved, config.to_dict()),
            resume=resume,
            empty={"units": [], "meta": {}, "skipped": [], "elapsed_seconds": 0.0},
            experiment="fewshot",
        )
        if isinstance(self.data, OwnTaskData):
            try:
                write_episode_records(self.out, self.data)
            except BaseException:
                self.lock.release()
                raise

    def close(self) -> None:
        """Release the output folder."""
        self.lock.release()

    def __enter__(self) -> FewShotExperiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_inputs(self) -> None:
        """Name a missing model, data folder, task or file now, not after minutes of meta-training."""
        c = self.config
        check_model(c.model)
        self.data.check()
        if any(FEWSHOT_SETTINGS[s].meta for s in c.settings):
            if not c.pool_tasks:
                raise ValueError(
                    "Settings with meta-training need pool tasks, and the task config names none; add "
                    "[[pool]] tasks or run only settings without meta-training (full, head, adapters, lora)."
                )
            if isinstance(self.data, OwnTaskData):
                self.data.check_pool(c.k_shot + c.q_query)
            pool = {}
            for task in c.pool_tasks:
                data = self.data.pool_split(task, "train")
                labels = len(set(data["label"]))
                if c.n_way is not None and c.n_way > labels:
                    raise ValueError(
                        f"n_way={c.n_way} is larger than pool task {task!r}'s {labels} labels; lower n_way, use "
                        "n_way = null (all of a task's classes) or leave the task out of pool_tasks."
                    )
                if c.pool_examples is not None:
                    data = stratified_subsample(data, c.pool_examples, seed=DATA_SEED)
                pool[task] = data
            # The meta-training episodes (k_shot + q_query examples per label): refused now, not after
            # the settings without meta-training have run their units.
            FewShotSampler(pool, c.n_way, c.k_shot, c.q_query, seed=c.seed)
            if isinstance(self.data, OwnTaskData) and c.meta_dev_episodes:
                dev = {t: d for t in c.pool_tasks if (d := self.data.pool_split(t, "dev")) is not None}
                if dev:  # the dev sets a task file names must hold a dev episode too
                    FewShotSampler(dev, c.n_way, c.k_shot, c.q_query, seed=c.seed)

    def _key(self, unit: dict[str, Any]) -> tuple:
        return unit["setting"], unit["task"], unit["k"], unit["episode"]

    def progress(self) -> str:
        """Where the run is, for a message on interruption: finished units and the current activity."""
        return f"{len(self.results['units'])} units, during {self.activity}"

    def _save(self) -> None:
        self.results["config"] = self.config.to_dict()
        self.results["environment"] = environment()
        write_json(self.out / "results.json", self.results)
        (self.out / "table.md").write_text(render_fewshot_report(self.results), encoding="utf-8")

    def run(self) -> dict[str, Any]:
        """Run every unfinished unit; returns the results dict (also in ``results.json``)."""
        c, began = self.config, time.perf_counter()
        resources = FewShotResources(
            c, checkpoint_dir=self.out / "checkpoints", log_dir=self.out / "tensorboard", data=self.data
        )
        self.activity = "reading the episodes"
        units = list(fewshot_units(c, resources))
        self.results["skipped"] = sorted({tuple(s) for s in self.results["skipped"]} | set(resources.skipped))
        done = {self._key(u) for u in self.results["units"]}
        todo = [u for u in units if u not in done]
        writers: dict[str, SummaryWriter] = {}
        finished_before = len(self.results["units"])
        try:
            with tqdm(total=len(units), initial=len(units) - len(todo), desc="units", unit="unit") as bar:
                for setting, task, k, episode in todo:
                    bar.set_postfix(setting=setting, task=task, k=k, episode=episode)
                    self.activity = f"unit {setting} {task} k={k} episode {episode} (it restarts)"
                    if setting not in self.results["meta"]:
                        self.activity += "; meta-training, if the setting has it, restarts too"
                    result = run_unit(c, setting, task, k, episode, resources=resources)
                    self._record(result, resources, writers)
                    bar.update(1)
        except BaseException:
            # An interrupted invocation that finished units still counts (the report's wall time).
            finished = len(self.results["units"]) - finished_before
            if finished:
                wall = time.perf_counter() - began
                self.results.setdefault("invocations", []).append(
                    {"wall_seconds": wall, "units": finished, "interrupted": True}
                )
                self._save()
            raise
        finally:
            for writer in writers.values():
                writer.close()
        self.activity = "the final save"
        wall = time.perf_counter() - began
        self.results.setdefault("invocations", []).append({"wall_seconds": wall, "units": len(todo)})
        self._save()
        tqdm.write(f"Finished {len(todo)} unit(s) in {wall:.0f} s; table: {self.out / 'table.md'}")
        return self.results

    def _record(self, result: dict[str, Any], resources: FewShotResources, writers: dict) -> None:
        setting = result["setting"]
        if setting in resources.meta_logs and setting not in self.results["meta"]:
            log = resources.meta_logs[setting]
            self.results["meta"][setting] = {
                "steps": log["steps"],
                "seconds": log["seconds"],
                "query_loss_first": log["query_loss"][0],
                "query_loss_last": log["query_loss"][-1],
                "query_loss": log["query_loss"],
                "inner_loss_first": log["inner_loss_first"],
                "inner_loss_last": log["inner_loss_last"],
                **{key: log[key] for key in ("dev_query_loss_before", "dev_query_loss_after") if key in log},
                **({"structure": log["structure"]} if "structure" in log else {}),
            }
        gold, predicted = result.pop("gold"), result.pop("predictions")
        test = resources.test(result["task"])
        relative = unit_path(setting, result["task"], result["k"], result["episode"])
        result["predictions"] = relative
        rows = [
            {"text_a": a, "text_b": b, "gold": g, "predicted": p}
            for a, b, g, p in zip(test["text_a"], test["text_b"], gold, predicted, strict=True)
        ]
        save_rows(self.out / relative, rows, result=result)
        writer = writers.get(setting)
        if writer is None:
            writer = writers[setting] = SummaryWriter(str(self.out / "tensorboard" / f"ft-{setting}"))
        tag = f"{result['task']}-k{result['k']}"
        for metric in ("accuracy", "macro_f1", "ft_final_loss"):
            if isinstance(result.get(metric), float) and not math.isnan(result[metric]):
                writer.add_scalar(f"{tag}/{metric}", result[metric], result["episode"])
        self.results["units"].append(result)
        # meta_seconds is the meta-training this unit waited for (its log's "seconds" are part of it)
        self.results["elapsed_seconds"] += result["seconds"] + result["meta_seconds"]
        self._save()
