"""``metakit fewshot verify``: recompute every accuracy and macro-F1 of an output folder from its predictions.

The shared `metakit.experiments.verify.verify_folder` walks the units and files; this module adds
the few-shot check: sklearn's accuracy and macro-F1 (over the unit's episode classes, test labels the
episode never shows left out, as `score` does).

Example:
    >>> verify_fewshot_folder("benchmarks/results/fewshot-cpu-quick")  # doctest: +SKIP
    []
"""

from __future__ import annotations

import math
from pathlib import Path

from metakit.experiments.fewshot.records import check_episode_records
from metakit.experiments.fewshot.unit import score
from metakit.experiments.folder import saved_config
from metakit.experiments.report import read_results
from metakit.experiments.verify import TOLERANCE, verify_folder

__all__ = ["verify_fewshot_folder"]


def _name(unit: dict) -> str:
    return f"{unit['setting']} {unit['task']} k={unit['k']} episode {unit['episode']}"


def _check(unit: dict, gold: list, predicted: list) -> list[str]:
    recomputed = score(gold, predicted, list(unit["classes"]))
    problems = []
    for metric in ("accuracy", "macro_f1"):
        reported, value = float(unit[metric]), recomputed[metric]
        same = (math.isnan(reported) and math.isnan(value)) or math.isclose(
            reported, value, rel_tol=0, abs_tol=TOLERANCE
        )
        if not same:
            problems.append(
                f"reported {metric} {reported:.4f} but sklearn on {unit['predictions']} gives {value:.4f}."
            )
    if recomputed["n_scored"] != unit.get("n_scored", recomputed["n_scored"]):
        problems.append(f"{recomputed['n_scored']} scorable examples, the result says {unit['n_scored']}.")
    return problems


def verify_fewshot_folder(out_dir: str | Path) -> list[str]:
    """One line per unit of ``out_dir`` whose reported scores its predictions file contradicts.

    Raises:
        ResultsFileError: ``results.json`` is missing or corrupted.
    """
    problems = verify_folder(out_dir, _check, _name, metrics=("accuracy", "macro_f1"), size_key="n_test")
    config = saved_config(out_dir) or {}
    if config.get("own_tasks") is not None:
        problems += check_episode_records(out_dir, read_results(Path(out_dir) / "results.json")["units"])
    return problems
