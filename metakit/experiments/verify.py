"""``metakit ner verify``: recompute every reported F1 of an output folder from its predictions files.

Example:
    >>> problems = verify_folder("benchmarks/results/priming-cpu")  # doctest: +SKIP
    >>> problems  # one line per unit whose result its predictions contradict
    []
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from metakit.experiments.data.metrics import entity_f1
from metakit.experiments.report import (
    ResultsFileError,
    load_predictions,
    load_unit_result,
    read_results,
)

__all__ = ["verify_folder"]

#: Reported and recomputed F1 are the same float computed twice; anything above rounding is a mismatch.
TOLERANCE = 1e-12


def _name(unit: dict) -> str:
    return f"setting {unit['setting']} {unit['lang']} seed {unit['seed']}"


def _check_f1(unit: dict, gold: list, predicted: list) -> list[str]:
    """seqeval's F1 of the stored tags against the reported one."""
    reported, recomputed = float(unit["f1"]), entity_f1(gold, predicted)
    if not math.isclose(recomputed, reported, rel_tol=0, abs_tol=TOLERANCE):
        return [f"reported F1 {reported:.4f} but seqeval on {unit['predictions']} gives {recomputed:.4f}."]
    return []


_SHOWN = {"f1": "F1"}


def _same_number(a: object, b: object) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE)


def verify_folder(
    out_dir: str | Path,
    check: Callable[[dict, list, list], list[str]] = _check_f1,
    name: Callable[[dict], str] = _name,
    metrics: tuple[str, ...] = ("f1",),
    size_key: str = "test_sentences",
) -> list[str]:
    """Check each unit of ``out_dir/results.json`` against its predictions file.

    For every unit: seqeval's F1 of the file's gold and predicted tags equals the reported F1, the
    file holds ``test_sentences`` sentences, and the result stored at the head of the file (if any)
    is the one in ``results.json``. Two units may not share a predictions file. ``metakit fewshot
    verify`` passes its own ``check`` (accuracy and macro-F1 by sklearn), ``name``, ``metrics``
    (compared with the file's stored result) and ``size_key`` (the unit's count of test examples).

    Args:
        check: ``check(unit, gold, predicted)`` → problem lines (recomputed metrics that disagree).

    Returns:
        One line per problem, naming the unit and the file; empty when everything agrees.

    Raises:
        ResultsFileError: ``results.json`` is missing or corrupted (a corrupted predictions file is a
            problem line instead, so the other units are still checked).
    """
    out = Path(out_dir)
    results = read_results(out / "results.json")
    problems, seen = [], {}
    for unit in results["units"]:
        try:
            label, relative = name(unit), unit["predictions"]
            reported = {metric: float(unit[metric]) for metric in metrics}
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"{out / 'results.json'}: a unit lacks {error} ({unit!r:.80}).")
            continue
        if relative in seen:
            problems.append(f"{label}: shares its predictions file {relative} with {seen[relative]}.")
        seen[relative] = label
        path = out / relative
        try:
            gold, predicted = load_predictions(path)
            stored = load_unit_result(path)
            wrong = check(unit, gold, predicted)
        except (ResultsFileError, ValueError) as error:
            problems.append(f"{label}: {error}")
            continue
        problems += [f"{label}: {line}" for line in wrong]
        if unit.get(size_key) is not None and len(gold) != unit[size_key]:
            problems.append(
                f"{label}: {relative} holds {len(gold)} examples, the result says {unit[size_key]}."
            )
        for metric, value in reported.items():
            if stored is not None and not _same_number(stored.get(metric, math.nan), value):
                problems.append(
                    f"{label}: {relative} was written with {_SHOWN.get(metric, metric)} {stored.get(metric)}, results.json says "
                    f"{value}."
                )
    return problems
