"""Records to text: the markdown table printed by ``metakit bench`` and written to ``results.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from metakit.bench.config import MEASURED
from metakit.bench.strategies import strategy_label

__all__ = ["legend", "markdown_report", "markdown_table", "memory_column"]

_COLUMNS = (
    "workload",
    "strategy",
    "S",
    "ms/meta-step",
    "CPU ms",
    "× hand-written",
    "saved for backward MiB",
    "peak {memory} MiB",
    "cosine to exact",
    "rel. error",
    "sine query MSE after meta-training",
    "status",
)
#: Shown only when some record has them (Implicit's per-task diagnostics, mean over tasks).
_OPTIONAL_COLUMNS = {
    "optimality_residual": "inner optimality residual",
    "cg_residual": "CG residual",
    "tasks_per_s_2_processes": "tasks/s, 1 / 2 processes",  # issue 11: filled once the executor exists
}


def _number(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _cosine(record: dict) -> str:
    text = _number(record.get("cosine"), 4)
    if record.get("fidelity_reference") and text != "–":
        return text + " †"  # against the proximal problem's exact gradient, not SecondOrder()'s
    if text == "–" and record.get("cosine_to_second_order") is not None:
        return _number(record["cosine_to_second_order"], 4) + " ‡"  # Implicit without its own reference
    return text


def _saved(record: dict) -> str:
    if record.get("saved_mib") is None and record.get("saved_note"):
        return "n/m §"
    return _number(record.get("saved_mib"))


def _row(record: dict, memory_key: str, optional: Sequence[str]) -> list[str]:
    config = record["config"]
    outcome = record.get("outcome") or {}
    status = record["status"] if record["status"] == "ok" else f"**{record['status']}**"
    return [
        config["workload"],
        strategy_label(config["strategy"]),
        str(config["steps"]),
        _number(record.get("time_ms")),
        _number(record.get("cpu_time_ms")),
        _number(record.get("overhead_ratio"), 2),
        _saved(record),
        _number(record.get(memory_key)),
        _cosine(record),
        _number(record.get("rel_error"), 3),
        _number(outcome.get("query_loss_after"), 3),
        *(
            _throughput(record) if key == "tasks_per_s_2_processes" else _scientific(record.get(key))
            for key in optional
        ),
        status,
    ]


def _throughput(record: dict) -> str:
    return f"{_number(record.get('tasks_per_s'))} / {_number(record.get('tasks_per_s_2_processes'))}"


def _scientific(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def memory_column(device: str) -> tuple[str, str]:
    """The record key and label of the peak-memory measure on ``device``."""
    return (
        ("cuda_peak_mib", "CUDA allocated") if device == "cuda" else ("peak_rss_increase_mib", "RSS increase")
    )


def markdown_table(records: Sequence[dict]) -> str:
    """One row per configuration; failed configurations show their status in bold."""
    device = records[0]["config"]["device"] if records else "cpu"
    memory_key, memory_name = memory_column(device)
    optional = [key for key in _OPTIONAL_COLUMNS if any(r.get(key) is not None for r in records)]
    header = [column.format(memory=memory_name) for column in _COLUMNS]
    header[-1:-1] = [_OPTIONAL_COLUMNS[key] for key in optional]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_row(record, memory_key, optional)) + " |" for record in records]
    return "\n".join(lines)


def legend(records: Sequence[dict]) -> str:
    """What each column of `markdown_table` means, for the records at hand."""
    outcomes = [r["outcome"] for r in records if r.get("outcome")]
    before = {
        r["config"]["steps"]: r["outcome"]["query_loss_before"]
        for r in records
        if r.get("outcome") and "query_loss_before" in r["outcome"]
    }
    outcome_text = (
        f"meta-train from the workload's initial weights for {outcomes[0]['meta_steps']} meta-steps "
        f"({outcomes[0]['outer_optimizer']}, fresh meta-batches), then adapt to each of "
        f"{outcomes[0]['eval_tasks']} held-out tasks with S inner steps and average the query MSE"
        + (
            " (the same evaluation before meta-training: "
            + ", ".join(f"{loss:.2f} at S={s}" for s, loss in sorted(before.items()))
            + ")"
            if before
            else ""
        )
        if outcomes
        else "not measured in this run"
    )
    lines = [
        "- **ms/meta-step**: median wall-clock time of the timed meta-steps after a warm-up step; **CPU ms**: "
        "the same steps' process CPU time, which does not count waiting for a core (the steadier measure "
        "on a shared machine; a configuration runs on one thread).",
        "- **× hand-written**: that time over a plain `torch.func` loop doing the same work "
        "(`benchmarks/reference.py`), timed alternately in the same process.",
        "- **saved for backward**: distinct storages autograd saved during one meta-step (a total, not a peak); "
        "§ n/m: not measurable for this mode, the reason is listed below the table.",
        "- **peak memory**: increase over the first (warm-up) meta-step of a fresh process.",
        "- **cosine / rel. error**: the meta-gradient against SecondOrder()'s on the same weights and batch; "
        "† Implicit: against the exact gradient of its own proximal inner problem solved to convergence; "
        "‡ Implicit where that reference is too costly: against SecondOrder()'s (MAML's) gradient, which "
        "Implicit does not aim at.",
        "- **status**: ok; **unsolved**: measured, but Implicit's inner optimality or CG residual ended above "
        "its residual_tol, so its gradient is not the implicit gradient it claims (listed below the table).",
        f"- **sine query MSE after meta-training** (sine only): {outcome_text}.",
    ]
    if any(r.get("tasks_per_s_2_processes") is not None for r in records):
        lines.append(
            "- **tasks/s, 1 / 2 processes**: tasks of the meta-batch per second, in one process and with the "
            "meta-batch split across two."
        )
    if any(r.get(key) is not None for r in records for key in ("optimality_residual", "cg_residual")):
        lines.append(
            "- **inner optimality residual**, **CG residual** (Implicit): mean over tasks of "
            "‖∇L_support(φ) + λ(φ − θ)‖ / ‖∇L_support(θ)‖ and of the conjugate-gradient solve's relative residual."
        )
    return "\n".join(lines)


def _failures(records: Sequence[dict]) -> list[str]:
    lines = []
    for record in records:
        if record["status"] not in MEASURED:
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
        legend(records),
        "",
        markdown_table(records),
    ]
    failures = _failures(records)
    if failures:
        lines += ["", "Configurations that did not complete:", "", *failures]
    for title, key in (
        ("Unsolved (Implicit's residuals above its tolerance)", "unsolved_note"),
        ("Fidelity notes", "fidelity_note"),
        ("§ Saved bytes not measurable", "saved_note"),
    ):
        notes = [f"- {_where(r)}: {r[key]}" for r in records if r.get(key)]
        if notes:
            lines += ["", f"{title}:", "", *notes]
    return "\n".join(lines) + "\n"


def _where(record: dict) -> str:
    config = record["config"]
    return f"{config['workload']} / {strategy_label(config['strategy'])} / S={config['steps']}"


def _loads(values: Sequence[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "–"
