"""Records to text: the markdown table printed by ``metakit bench`` and written to ``results.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.strategies import strategy_label

__all__ = ["markdown_report", "markdown_table"]

_COLUMNS = (
    "workload",
    "strategy",
    "S",
    "ms/meta-step",
    "× hand-written",
    "saved for backward MiB",
    "peak {memory} MiB",
    "cosine to exact",
    "rel. error",
    "sine query loss after",
    "status",
)


def _number(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _row(record: dict, memory_key: str) -> list[str]:
    config = record["config"]
    outcome = record.get("outcome") or {}
    status = record["status"] if record["status"] == "ok" else f"**{record['status']}**"
    return [
        config["workload"],
        strategy_label(config["strategy"]),
        str(config["steps"]),
        _number(record.get("time_ms")),
        _number(record.get("overhead_ratio"), 2),
        _number(record.get("saved_mib")),
        _number(record.get(memory_key)),
        _number(record.get("cosine"), 4),
        _number(record.get("rel_error"), 3),
        _number(outcome.get("query_loss_after"), 3),
        status,
    ]


def memory_column(device: str) -> tuple[str, str]:
    """The record key and label of the peak-memory measure on ``device``."""
    return (
        ("cuda_peak_mib", "CUDA allocated") if device == "cuda" else ("peak_rss_increase_mib", "RSS increase")
    )


def markdown_table(records: Sequence[dict]) -> str:
    """One row per configuration; failed configurations show their status in bold."""
    device = records[0]["config"]["device"] if records else "cpu"
    memory_key, memory_name = memory_column(device)
    header = [column.format(memory=memory_name) for column in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_row(record, memory_key)) + " |" for record in records]
    return "\n".join(lines)


def _failures(records: Sequence[dict]) -> list[str]:
    lines = []
    for record in records:
        if record["status"] != "ok":
            config = record["config"]
            error = (record.get("error") or "").splitlines()[0][:300] if record.get("error") else ""
            lines.append(
                f"- {config['workload']} / {config['strategy']} / S={config['steps']}: {record['status']} — {error}"
            )
    return lines


def markdown_report(records: Sequence[dict], environment: dict) -> str:
    """The table with the machine, versions and measurement notes above it and failures below."""
    versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items() if v)
    machine = environment["machine"]
    lines = [
        "# metakit bench results",
        "",
        f"- date: {environment['date_utc']}; commit {environment.get('git_commit')}",
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gib']} GiB; "
        f"{machine['platform']}",
        f"- device: {environment['device']}{' (' + environment['gpu'] + ')' if 'gpu' in environment else ''}; "
        f"torch threads per configuration: {environment['torch_threads_per_worker']}",
        f"- {versions}; Python {environment['python']}",
        f"- load average (1/5/15 min) at start {_loads(environment.get('load_average_at_start'))}, "
        f"at end {_loads(environment.get('load_average_at_end'))}",
        "",
        "ms/meta-step: median of the timed meta-steps after a warm-up step. × hand-written: that time over "
        "a plain `torch.func` loop doing the same work, timed alternately in the same process. Saved for "
        "backward: distinct storages autograd saved during one meta-step. Peak memory: over the first "
        "(warm-up) meta-step of a fresh process. Cosine / rel. error: meta-gradient against SecondOrder's "
        "on the same weights and batch.",
        "",
        markdown_table(records),
    ]
    failures = _failures(records)
    if failures:
        lines += ["", "Configurations that did not complete:", "", *failures]
    return "\n".join(lines) + "\n"


def _loads(values: Sequence[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "–"
