"""Tables of few-shot results: mean ± std over episodes per task, and paired comparisons of settings.

Both read the unit dicts `run_unit` returns.

Example:
    >>> print(fewshot_table(units, metric="accuracy"))  # doctest: +SKIP
    >>> paired_comparison(units, "meta_adapters", "adapters")  # doctest: +SKIP
    {'pairs': 48, 'wins': 30, 'losses': 15, 'ties': 3, 'mean_difference': 0.021, 'ci95': (0.004, 0.038)}
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.paired import interval_text, paired_difference

__all__ = ["COMPARISONS", "fewshot_table", "paired_comparison", "render_fewshot_report"]


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
        two-sided Student-t confidence interval of the mean difference (``None`` with fewer than 2 pairs);
        ``tasks`` and ``ci95_tasks``, the same interval over the per-task mean differences, which does not
        count a task's k and episodes as independent samples (``None`` with fewer than 2 tasks).
    """
    values: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for unit in units:
        if unit["setting"] in values and not math.isnan(unit[metric]):
            values[unit["setting"]][(unit["task"], unit["k"], unit["episode"])] = unit[metric]
    result = paired_difference(values[a], values[b], confidence)
    return {
        "a": a,
        "b": b,
        "metric": metric,
        **{key: result[key] for key in ("pairs", "wins", "losses", "ties", "mean_difference", "ci95")},
        "tasks": result["groups"],
        "ci95_tasks": result["ci95_groups"],
    }


#: The paired comparisons the report shows: (a, b) means "a against b".
COMPARISONS = (
    ("meta_adapters", "adapters"),
    ("meta_adapters", "priming"),
    ("meta_lora", "lora"),
    ("meta_tarp", "meta_adapters"),
    ("meta_tams", "meta_adapters"),
    ("meta_tams", "meta_tarp"),
)


def _comparison_rows(units: Sequence[dict[str, Any]]) -> list[str]:
    present = {unit["setting"] for unit in units}
    rows = []
    for a, b in COMPARISONS:
        if a not in present or b not in present:
            continue
        for metric in ("accuracy", "macro_f1"):
            r = paired_comparison(units, a, b, metric)
            label = f"({FEWSHOT_SETTINGS[a].letter}) {a} vs ({FEWSHOT_SETTINGS[b].letter}) {b}"
            rows.append(
                f"| {label} | {metric} | {r['pairs']} | {r['wins']}/{r['losses']}/{r['ties']} | "
                f"{100 * r['mean_difference']:+.1f} | {interval_text(r['ci95'])} | {interval_text(r['ci95_tasks'])} |"
            )
    if not rows:
        return []
    return [
        "**Paired comparisons** over tasks × k × episodes (difference × 100, a − b; 95% Student-t intervals: "
        "over the pairs, and over the per-task mean differences, which does not treat a task's k and "
        "episodes as independent)\n",
        "| a vs b | metric | pairs | wins/losses/ties | mean difference | 95% CI, pairs | 95% CI, tasks |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


#: Meta-steps averaged at each end of the training query-loss curve in the report.
SMOOTH_STEPS = 5


def _first_last(log: dict[str, Any]) -> str:
    losses = log.get("query_loss")
    if not losses:  # folders written before the per-step log was kept
        return f"{log['query_loss_first']:.3f} → {log['query_loss_last']:.3f}"
    n = min(SMOOTH_STEPS, len(losses))
    return f"{sum(losses[:n]) / n:.3f} → {sum(losses[-n:]) / n:.3f}"


def _before_after(log: dict[str, Any]) -> str:
    if "dev_query_loss_before" not in log:
        return "–"
    return f"{log['dev_query_loss_before']:.3f} → {log['dev_query_loss_after']:.3f}"


def _own_tasks_title(own: dict[str, Any]) -> str:
    pool = ", ".join(task["name"] for task in own.get("pool", [])) or "none"
    return (
        "# Few-shot results (your own tasks)\n\n"
        f"Meta-training pool: {pool}. The targets' k-shot episodes are drawn with seed {own.get('seed', 0)}, "
        "k examples of every class, and recorded in `episodes/`.\n"
    )


def render_fewshot_report(results: dict[str, Any]) -> str:
    """The markdown of a results dict: accuracy and macro-F1 tables, paired comparisons, notes."""
    units = results["units"]
    own = (results.get("config") or {}).get("own_tasks")
    out = ["# Few-shot results (LEOPARD)\n" if own is None else _own_tasks_title(own)]
    if not units:
        return "\n".join([*out, "No finished unit yet."]) + "\n"
    out += [fewshot_table(units, "accuracy"), fewshot_table(units, "macro_f1"), *_comparison_rows(units)]
    if results.get("meta"):
        out.append("**Meta-training** (on the pool, once per setting)\n")
        out.append(
            "| setting | steps | seconds | training query loss, first → last | "
            "dev query loss, before → after |"
        )
        out.append("|---|---|---|---|---|")
        for key, log in results["meta"].items():
            out.append(
                f"| {key} | {log['steps']} | {log['seconds']:.0f} | {_first_last(log)} | {_before_after(log)} |"
            )
            if log.get("structure"):
                counts = Counter(log["structure"].values())
                out.append(f"| {key}: structure chosen | | | {dict(sorted(counts.items()))} | |")
        out.append(
            "\nTraining query losses are means over the first and last "
            f"{SMOOTH_STEPS} meta-steps where the per-step log is kept (one step's loss swings with the task "
            "drawn); dev query losses are on the same fixed dev episodes of the pool for every setting, "
            "after the inner loop, before and after meta-training."
        )
        out.append("")
    unseen = Counter()
    for unit in units:
        unseen.update(unit.get("unseen_test_labels", {}))
    if unseen:
        out.append(
            f"Test labels that a unit's episode never shows (counted, not scored): {dict(sorted(unseen.items()))}."
        )
    for task, k, episode in results.get("skipped", []):
        out.append(f"Skipped {task} k={k} episode {episode}: its file is empty upstream.")
    calls = results.get("invocations", [])
    wall = sum(call["wall_seconds"] for call in calls)
    out.append(f"\n{len(units)} units; wall time {wall / 60:.1f} min over {len(calls)} invocation(s).")
    if results.get("merged_from"):
        per_folder = {
            folder: sum(c["wall_seconds"] for c in calls if c.get("folder") == folder) / 60
            for folder in results["merged_from"]
        }
        out.append(
            "Merged from folders that ran side by side (`metakit fewshot merge`), each on one thread; wall "
            "time per folder: "
            + ", ".join(f"{name} {minutes:.1f} min" for name, minutes in per_folder.items())
            + f" (elapsed: the longest, {max(per_folder.values()):.1f} min)."
        )
    return "\n".join(out) + "\n"
