"""``metakit ner verify``: recompute every reported F1 of an output folder from its predictions files.

Example:
    >>> problems = verify_folder("benchmarks/results/priming-cpu")  # doctest: +SKIP
    >>> problems  # one line per unit whose result its predictions contradict
    []
"""

from __future__ import annotations

import math
from pathlib import Path

from metakit.experiments.report import (
    ResultsFileError,
    load_predictions,
    load_unit_result,
    read_results,
)
from metakit.tasks.metrics import entity_f1

__all__ = ["verify_folder"]

#: Reported and recomputed F1 are the same float computed twice; anything above rounding is a mismatch.
TOLERANCE = 1e-12


def _name(unit: dict) -> str:
    return f"setting {unit['setting']} {unit['lang']} seed {unit['seed']}"


def verify_folder(out_dir: str | Path) -> list[str]:
    """Check each unit of ``out_dir/results.json`` against its predictions file.

    For every unit: seqeval's F1 of the file's gold and predicted tags equals the reported F1, the
    file holds ``test_sentences`` sentences, and the result stored at the head of the file (if any)
    is the one in ``results.json``. Two units may not share a predictions file.

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
            name, relative = _name(unit), unit["predictions"]
            reported = float(unit["f1"])
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"{out / 'results.json'}: a unit lacks {error} ({unit!r:.80}).")
            continue
        if relative in seen:
            problems.append(f"{name}: shares its predictions file {relative} with {seen[relative]}.")
        seen[relative] = name
        path = out / relative
        try:
            gold, predicted = load_predictions(path)
            stored = load_unit_result(path)
            recomputed = entity_f1(gold, predicted)
        except (ResultsFileError, ValueError) as error:
            problems.append(f"{name}: {error}")
            continue
        if not math.isclose(recomputed, reported, rel_tol=0, abs_tol=TOLERANCE):
            problems.append(
                f"{name}: reported F1 {reported:.4f} but seqeval on {relative} gives {recomputed:.4f}."
            )
        if unit.get("test_sentences") is not None and len(gold) != unit["test_sentences"]:
            problems.append(
                f"{name}: {relative} holds {len(gold)} sentences, the result says {unit['test_sentences']}."
            )
        if stored is not None and not math.isclose(
            float(stored.get("f1", math.nan)), reported, abs_tol=TOLERANCE
        ):
            problems.append(
                f"{name}: {relative} was written with F1 {stored.get('f1')}, results.json says {reported}."
            )
    return problems
