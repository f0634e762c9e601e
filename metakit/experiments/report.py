"""Results on disk: ``results.json`` (every finished unit), predictions files, and the Table-1 markdown."""

from __future__ import annotations

import gzip
import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metakit.experiments.paired import interval_text, paired_difference
from metakit.experiments.settings import SETTINGS

__all__ = [
    "ResultsFileError",
    "adaptation_table",
    "environment",
    "load_predictions",
    "load_unit_result",
    "markdown_table",
    "meta_priming_comparison",
    "paired_comparisons",
    "read_results",
    "render_report",
    "save_predictions",
    "save_rows",
    "write_json",
]

#: The paper's Table 1 F1 (hi, af, az, lt, et, nl), for the comparison column.
PAPER_F1 = {
    1: [86.73, 91.29, 87.70, 89.43, 90.88, 91.47],
    2: [72.71, 79.11, 74.24, 78.34, 81.23, 78.90],
    3: [77.76, 84.10, 81.08, 83.00, 85.13, 83.89],
    4: [81.25, 88.23, 83.29, 86.30, 87.18, 88.97],
    5: [79.55, 87.78, 82.28, 85.79, 86.56, 88.82],
    6: [80.18, 85.82, 81.47, 85.73, 85.86, 88.13],
    7: [80.23, 86.46, 80.35, 84.43, 86.14, 88.49],
}
PAPER_LANGS = ["hi", "af", "az", "lt", "et", "nl"]


class ResultsFileError(ValueError):
    """A file of an output folder (``results.json``, a predictions file) is missing or unreadable."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (write a temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_results(path: Path) -> dict[str, Any]:
    """The contents of a ``results.json``; a missing or corrupted file raises one clear error naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsFileError(
            f"{str(path)!r} does not exist; is this an output folder of `metakit ner run` or `metakit fewshot run`?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsFileError(f"{str(path)!r} is not readable JSON ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list) or "config" not in data:
        raise ResultsFileError(f"{str(path)!r} is not a results file: it lacks the 'units' list or 'config'.")
    return data


def save_predictions(
    path: Path,
    tokens: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    predicted: Sequence[Sequence[str]],
    *,
    result: dict[str, Any] | None = None,
) -> None:
    """Write one JSON line per sentence, ``{"tokens", "gold", "predicted"}``, atomically.

    A ``.gz`` path is gzip-compressed (with a fixed timestamp, so equal predictions give equal bytes).
    ``result``, when given, goes first as ``{"result": {...}}``: the unit's F1 and its predictions land
    in one file with one rename, so they can never come from different runs.
    """
    rows = [
        {"tokens": list(t), "gold": list(g), "predicted": list(p)}
        for t, g, p in zip(tokens, gold, predicted, strict=True)
    ]
    save_rows(path, rows, result=result)


def save_rows(path: Path, rows: Sequence[dict[str, Any]], *, result: dict[str, Any] | None = None) -> None:
    """Write ``result`` (if given) as ``{"result": {...}}``, then one JSON line per row, atomically.

    Each row holds at least ``gold`` and ``predicted`` (tag lists for NER, label names for few-shot
    classification). A ``.gz`` path is gzip-compressed with a fixed timestamp (equal rows, equal bytes).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"result": result}, ensure_ascii=False)] if result is not None else []
    lines += [json.dumps(row, ensure_ascii=False) for row in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _prediction_rows(path: Path) -> list[dict[str, Any]]:
    try:
        raw = Path(path).read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        raise ResultsFileError(f"Predictions file {str(path)!r} does not exist.") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsFileError(f"Predictions file {str(path)!r} is corrupted ({error}).") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not ("result" in row or {"gold", "predicted"} <= set(row)):
            raise ResultsFileError(
                f"Predictions file {str(path)!r}, line {number}: expected 'gold' and 'predicted' tags."
            )
    return rows


def load_predictions(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """``(gold, predicted)`` tag sequences from a `save_predictions` file (``.jsonl`` or ``.jsonl.gz``)."""
    rows = [row for row in _prediction_rows(path) if "result" not in row]
    return [row["gold"] for row in rows], [row["predicted"] for row in rows]


def load_unit_result(path: Path) -> dict[str, Any] | None:
    """The unit result stored at the head of a predictions file, or ``None`` if it has none."""
    rows = _prediction_rows(path)
    return rows[0]["result"] if rows and "result" in rows[0] else None


def environment() -> dict[str, Any]:
    """The machine and library versions results came from."""
    import datasets
    import seqeval
    import torch
    import transformers

    import metakit

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "seqeval": getattr(seqeval, "__version__", "unknown"),
        "metakit": metakit.__version__,
    }


def _cell(values: Sequence[float], degenerate: bool = False) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    spread = f"± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "± –"  # one seed: no std
    return f"{mean:.2f} {spread}" + (" ‡" if degenerate else "")


def _degenerate(unit: dict) -> bool:
    """An all-O unit: the tagger predicted no entity at all, so its F1 of 0 says nothing about the setting."""
    return bool(unit.get("all_o"))


def markdown_table(units: Sequence[dict], targets: Sequence[str], title: str = "") -> str:
    """Table 1 of the paper: a row per setting, F1 mean ± std over seeds per target, % params updated."""
    header = ["#", "setting", "% params", *targets, "avg", "paper avg"]
    lines = [
        f"### {title}" if title else "",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for number, setting in SETTINGS.items():
        rows = [u for u in units if u["setting"] == number]
        if not rows:
            continue
        share = statistics.fmean(u["fraction_updated"] for u in rows)
        cells = [
            _cell(
                [u["f1"] for u in rows if u["lang"] == lang],
                degenerate=any(_degenerate(u) for u in rows if u["lang"] == lang),
            )
            for lang in targets
        ]
        seeds = sorted({u["seed"] for u in rows})
        per_seed = [[u["f1"] for u in rows if u["seed"] == s and u["lang"] in targets] for s in seeds]
        complete = [statistics.fmean(v) for v in per_seed if len(v) == len(targets)]
        paper = [PAPER_F1[number][PAPER_LANGS.index(lang)] for lang in targets if lang in PAPER_LANGS]
        paper_avg = f"{statistics.fmean(paper):.2f}" if len(paper) == len(targets) else "–"
        row = [str(number), setting.name, f"{100 * share:.2f}", *cells, _cell(complete), paper_avg]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Entity-level micro F1 × 100 (seqeval), mean ± std over seeds (`± –`: one seed); `avg` over the listed "
        "targets, for seeds that finished all of them; `% params` = share of the model's parameters updated in "
        "target fine-tuning."
    )
    flagged = sorted(f"s{u['setting']} {u['lang']} seed {u['seed']}" for u in units if _degenerate(u))
    if flagged:
        lines.append("")
        lines.append(
            f"‡ degenerate: every prediction is O (no entity found) in {len(flagged)} unit(s): "
            f"{', '.join(flagged)}. Their F1 of 0 is a training failure, not a measurement of the setting."
        )
    return "\n".join(lines).lstrip("\n") + "\n"


def meta_priming_comparison(units: Sequence[dict], targets: Sequence[str]) -> str:
    """Per target: does meta priming (4) beat adapter tuning (3), fine-tuning priming (5), MAML loop (6), 1 step (7)?

    Compares mean F1 over the seeds both settings finished; the paper's answer is "yes" for all 24 pairs.
    """
    lines = ["| target | 4 > 3 | 4 > 5 | 4 > 6 | 4 > 7 |", "|---|---|---|---|---|"]
    wins = {other: [0, 0] for other in (3, 5, 6, 7)}
    for lang in targets:
        cells = []
        for other in (3, 5, 6, 7):
            mine = {u["seed"]: u["f1"] for u in units if u["setting"] == 4 and u["lang"] == lang}
            theirs = {u["seed"]: u["f1"] for u in units if u["setting"] == other and u["lang"] == lang}
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                cells.append("–")
                continue
            delta = 100 * (
                statistics.fmean(mine[s] for s in seeds) - statistics.fmean(theirs[s] for s in seeds)
            )
            wins[other][0] += delta > 0
            wins[other][1] += 1
            cells.append(f"{'yes' if delta > 0 else 'tie' if delta == 0 else 'no'} ({delta:+.2f})")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    lines.append("| **wins** | " + " | ".join(f"{w}/{n}" if n else "–" for w, n in wins.values()) + " |")
    return "\n".join(lines) + "\n"


#: The paired comparisons of the report: meta priming (4) against each setting it claims to beat.
PAIRED = ((4, 3), (4, 5), (4, 6), (4, 7))


def paired_comparisons(units: Sequence[dict], targets: Sequence[str]) -> str:
    """Meta priming (4) against 3, 5, 6, 7 over the (target, seed) units both have, with intervals.

    One row per comparison (over all pairs and over the per-target means), then one column per target:
    its mean difference over seeds with the Student-t interval over those seeds.
    """
    f1 = {(u["setting"], u["lang"], u["seed"]): u["f1"] for u in units}
    header = "| a vs b | pairs | wins/losses/ties | mean difference | 95% CI, pairs | 95% CI, targets | "
    lines = [
        header + " | ".join(targets) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(targets),
    ]
    for a, b in PAIRED:
        values = [{k[1:]: v for k, v in f1.items() if k[0] == setting} for setting in (a, b)]
        result = paired_difference(*values)
        if not result["pairs"]:
            continue
        cells = []
        for lang in targets:
            group = result["by_group"].get(lang)
            cells.append(
                "–"
                if group is None
                else f"{100 * group['mean_difference']:+.1f} {interval_text(group['ci95'])} (n={group['pairs']})"
            )
        lines.append(
            f"| {a} vs {b} | {result['pairs']} | {result['wins']}/{result['losses']}/{result['ties']} | "
            f"{100 * result['mean_difference']:+.1f} | {interval_text(result['ci95'])} | "
            f"{interval_text(result['ci95_groups'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def adaptation_table(priming: dict[str, dict[str, Any]]) -> str:
    """Per meta-priming run: mean query loss before and after the inner loop, and the gain (pre − post).

    A gain near zero means the inner loop hardly adapts, and priming is then, to first order, plain
    multi-task training. Runs recorded before the gain was measured show "–".
    """
    lines = [
        "| priming run | query loss before adaptation | after | gain | relative gain |",
        "|---|---|---|---|---|",
    ]

    def order(key: str) -> tuple[int, int]:
        setting, seed = key.split("-seed")
        return int(setting[1:]), int(seed)

    for key, info in sorted(priming.items(), key=lambda item: order(item[0])):
        number = order(key)[0]
        if SETTINGS[number].priming == "finetune":
            continue  # no inner loop
        if "adaptation_gain" in info:
            cells = [
                f"{info['pre_query_loss']:.4f}",
                f"{info['post_query_loss']:.4f}",
                f"{info['adaptation_gain']:+.4f}",
                f"{100 * info['relative_adaptation_gain']:+.1f}%",
            ]
        else:
            cells = ["–"] * 4
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe(env: dict[str, Any]) -> str:
    return (
        f"{env['processor']}, {env['cpu_count']} CPUs ({env['torch_threads']} torch threads), {env['platform']}; "
        f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"datasets {env['datasets']}, metakit {env['metakit']}"
    )


def render_report(results: dict[str, Any]) -> str:
    """The ``table.md`` of an output folder from its ``results.json`` contents."""
    config, units = results["config"], results["units"]
    targets = config["targets"]
    minutes = results.get("elapsed_seconds", 0.0) / 60
    parts = [
        f"# Priming experiment — model `{config['model']}`\n",
        f"{len(units)} units finished, {minutes:.1f} min of compute in this folder. "
        f"Environment: {_describe(results['environment'])}.\n",
        markdown_table(units, targets, title="F1 on the target test sets"),
        "### Does meta priming (4) beat the other priming variants and adapter tuning?\n",
        "Difference of mean F1 × 100 over the seeds both settings finished.\n",
        meta_priming_comparison(units, targets),
        "### Paired comparisons over (target, seed)\n",
        "F1 difference × 100, a − b, over the units both settings finished; 95% Student-t intervals over "
        "the pairs and over the per-target means (which does not count a target's seeds as independent); "
        "per target: the mean over its seeds, the interval over those seeds, and their number.\n",
        paired_comparisons(units, targets),
    ]
    if any(SETTINGS[int(k.split("-")[0][1:])].priming != "finetune" for k in results.get("priming", {})):
        parts += [
            "### Does the inner loop adapt?\n",
            "Mean over the priming steps of the query loss with the current parameters (before the inner "
            "loop) and with the adapted ones (after it); gain = before − after. Near zero, meta priming is "
            "just multi-task training.\n",
            adaptation_table(results["priming"]),
        ]
    cut = {k: v["truncated"] for k, v in results.get("truncated", {}).items() if v["truncated"]}
    parts.append(
        f"Sentences truncated to {config['max_length']} sub-words (tagged O past the cut): {cut or 'none'}.\n"
    )
    if results.get("failed"):
        parts.append(f"Failed priming runs (their units are missing): {results['failed']}\n")
    return "\n".join(parts)
