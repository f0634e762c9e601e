"""Paired differences with Student-t intervals, shared by the few-shot and the priming reports."""

import math
import statistics

import pytest

pytest.importorskip("scipy")

from metakit.experiments.paired import interval_text, paired_difference, t_interval
from metakit.experiments.report import paired_comparisons


def test_paired_difference_by_hand():
    a = {("hi", 0): 0.50, ("hi", 1): 0.70, ("af", 0): 0.20, ("af", 1): 0.40, ("az", 0): 0.9}
    b = {("hi", 0): 0.40, ("hi", 1): 0.70, ("af", 0): 0.30, ("af", 1): 0.10}  # az: no pair
    result = paired_difference(a, b)
    diffs = [0.10, 0.0, -0.10, 0.30]
    assert result["pairs"] == 4 and (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)
    assert math.isclose(result["mean_difference"], statistics.fmean(diffs))
    # t(0.975, 3) = 3.182446305284263
    half = 3.182446305284263 * statistics.stdev(diffs) / 2
    low, high = result["ci95"]
    assert math.isclose(low, statistics.fmean(diffs) - half) and math.isclose(
        high, statistics.fmean(diffs) + half
    )
    assert result["groups"] == 2 and result["by_group"]["hi"]["pairs"] == 2
    assert math.isclose(result["by_group"]["af"]["mean_difference"], 0.10)
    # two per-group means (0.05 and 0.10): t(0.975, 1) = 12.706204736174707
    half = 12.706204736174707 * statistics.stdev([0.05, 0.10]) / math.sqrt(2)
    assert math.isclose(result["ci95_groups"][1], 0.075 + half)
    assert t_interval([0.3]) is None and interval_text(None) == "–"
    assert interval_text((-0.013, 0.016)) == "[-1.3, +1.6]"


def test_the_priming_report_pairs_meta_priming_with_each_setting_by_target_and_seed():
    units = [
        {"setting": setting, "lang": lang, "seed": seed, "f1": f1}
        for setting, lang, seed, f1 in [
            (4, "hi", 0, 0.50), (4, "hi", 1, 0.60), (4, "af", 0, 0.40), (4, "af", 1, 0.45),
            (3, "hi", 0, 0.40), (3, "hi", 1, 0.50), (3, "af", 0, 0.35), (3, "af", 1, 0.45),
            (5, "hi", 0, 0.55),
        ]
    ]  # fmt: skip
    table = paired_comparisons(units, ["hi", "af"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"4 vs 3", "4 vs 5"}  # 6 and 7 have no units
    assert "| 4 | 3/0/1 | +6.2 |" in rows["4 vs 3"]  # (10 + 10 + 5 + 0) / 4
    assert "+10.0 [+10.0, +10.0] (n=2)" in rows["4 vs 3"]  # hi: both seeds +10
    assert "| 1 | 0/1/0 | -5.0 |" in rows["4 vs 5"] and rows["4 vs 5"].endswith("| -5.0 – (n=1) | – |")
