"""Paired differences between two settings measured on the same units, with Student-t intervals.

A unit is keyed by a tuple whose first element is its group (a task, a target language); the other
elements (k, episode, seed) are repeats within the group. The interval over the per-group mean
differences does not count a group's repeats as independent samples.

Example:
    >>> paired_difference({("hi", 0): 0.5, ("af", 0): 0.6}, {("hi", 0): 0.4, ("af", 0): 0.4})["pairs"]
    2
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from scipy import stats

__all__ = ["interval_text", "paired_difference", "t_interval"]


def paired_difference(
    a: Mapping[tuple[Hashable, ...], float], b: Mapping[tuple[Hashable, ...], float], confidence: float = 0.95
) -> dict[str, Any]:
    """``a − b`` over the keys both have.

    Returns:
        ``pairs``, ``wins`` (a > b), ``losses``, ``ties``, ``mean_difference`` and ``ci95``, the
        two-sided Student-t interval of the mean difference (``None`` with fewer than 2 pairs);
        ``groups`` and ``ci95_groups``, the same over the per-group mean differences (``None`` with
        fewer than 2 groups); ``by_group``: each group's mean difference and number of pairs.
    """
    shared = sorted(set(a) & set(b), key=repr)
    diffs = [a[key] - b[key] for key in shared]
    per_group: dict[Hashable, list[float]] = defaultdict(list)
    for key, diff in zip(shared, diffs, strict=True):
        per_group[key[0]].append(diff)
    return {
        "pairs": len(diffs),
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "mean_difference": statistics.fmean(diffs) if diffs else float("nan"),
        "ci95": t_interval(diffs, confidence),
        "groups": len(per_group),
        "ci95_groups": t_interval([statistics.fmean(v) for v in per_group.values()], confidence),
        "by_group": {
            group: {
                "mean_difference": statistics.fmean(v),
                "pairs": len(v),
                "ci95": t_interval(v, confidence),
            }
            for group, v in per_group.items()
        },
    }


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The two-sided Student-t interval of the mean of ``values`` (``None`` with fewer than 2)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = (
        stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    )
    return float(mean - half), float(mean + half)


def interval_text(ci: tuple[float, float] | None, scale: float = 100) -> str:
    """``[-1.3, +1.6]`` (× ``scale``), or ``–`` without an interval."""
    return "–" if ci is None else f"[{scale * ci[0]:+.1f}, {scale * ci[1]:+.1f}]"
