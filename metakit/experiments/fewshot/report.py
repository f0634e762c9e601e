"""Tables of few-shot results: mean ± std over episodes per task, and paired comparisons of settings.

Both read the unit dicts :func:`~metakit.experiments.fewshot.unit.run_unit` returns.

Example:
    >>> print(fewshot_table(units, metric="accuracy"))  # doctest: +SKIP
    >>> paired_comparison(units, "meta_adapters", "adapters")  # doctest: +SKIP
    {'pairs': 48, 'wins': 30, 'losses': 15, 'ties': 3, 'mean_difference': 0.021, 'ci95': (0.004, 0.038)}
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from scipy import stats

from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS

__all__ = ["fewshot_table", "paired_comparison"]


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def fewshot_table(units: Sequence[dict[str, Any]], metric: str = "accuracy") -> str:
    """A markdown table per k: settings × tasks, ``mean ± std`` (× 100) of ``metric`` over episodes.

    The last column averages each setting's per-task means. Units with a NaN metric (no test example
    of a class the episode shows) are left out and counted under the table.
    """
    by_k: dict[int, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    skipped = 0
    for unit in units:
        value = unit[metric]
        if isinstance(value, float) and math.isnan(value):
            skipped += 1
            continue
        by_k[unit["k"]][(unit["setting"], unit["task"])].append(value)
    tasks = sorted({unit["task"] for unit in units})
    settings = [s for s in FEWSHOT_SETTINGS if any(unit["setting"] == s for unit in units)]
    out = []
    for k in sorted(by_k):
        cells = by_k[k]
        out.append(f"**k = {k}**, {metric} × 100, mean ± std over episodes\n")
        out.append("| setting | " + " | ".join(tasks) + " | mean |")
        out.append("|---" * (len(tasks) + 2) + "|")
        for key in settings:
            setting = FEWSHOT_SETTINGS[key]
            row = [_cell(cells.get((key, task), [])) for task in tasks]
            means = [statistics.fmean(cells[(key, t)]) for t in tasks if cells.get((key, t))]
            out.append(f"| ({setting.letter}) {setting.label} | " + " | ".join(row) + f" | {_cell(means)} |")
        out.append("")
    if skipped:
        out.append(f"{skipped} unit(s) had no scorable test example and are left out.")
    return "\n".join(out)


def paired_comparison(
    units: Sequence[dict[str, Any]], a: str, b: str, metric: str = "accuracy", confidence: float = 0.95
) -> dict[str, Any]:
    """Setting ``a`` against ``b`` over the (task, k, episode) units both have.

    Returns:
        ``pairs``, ``wins`` (a > b), ``losses``, ``ties``, ``mean_difference`` (a − b) and ``ci95``, the
        two-sided Student-t confidence interval of the mean difference (``None`` with fewer than 2 pairs).
    """
    values: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for unit in units:
        if unit["setting"] in values and not math.isnan(unit[metric]):
            values[unit["setting"]][(unit["task"], unit["k"], unit["episode"])] = unit[metric]
    shared = sorted(set(values[a]) & set(values[b]))
    diffs = [values[a][key] - values[b][key] for key in shared]
    result: dict[str, Any] = {
        "a": a,
        "b": b,
        "metric": metric,
        "pairs": len(diffs),
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "mean_difference": statistics.fmean(diffs) if diffs else float("nan"),
        "ci95": None,
    }
    if len(diffs) >= 2:
        half = (
            stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1)
            * statistics.stdev(diffs)
            / math.sqrt(len(diffs))
        )
        result["ci95"] = (float(result["mean_difference"] - half), float(result["mean_difference"] + half))
    return result
