"""Two or more strategies timed side by side on one workload: the ratio, its floor in FLOPs, and memory.

`metakit bench` measures each configuration in its own process, one after another, so on a shared
machine two rows can see different loads. Here one process builds a learner per strategy on the
same weights and batches, runs one warm-up meta-step of each, then alternates timed meta-steps
(the order rotates every round), so every round compares the strategies under the same load; the
ratio to the first strategy is the median of the rounds' ratios. Beside it: the FLOPs of one
meta-step of each (``torch.utils.flop_counter.FlopCounterMode``: what a compute-bound device cannot
avoid), and the peak memory of the first meta-step in a fresh process, measured as
`metakit.bench.plan_validation` measures it (fixed mmap threshold, one thread). Run::

    python -m metakit.bench.side_by_side --workload bert-long --steps 10 \\
        --strategies second-order second-order-forward --out benchmarks/results/forward-mode.md

Records go to ``<out>.jsonl`` (one per run of a workload and S; a rerun adds one) and the table to ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

__all__ = ["compare", "main"]

MIB = 2**20


def _flops(learner, tasks) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        learner.meta_step(tasks)
    return float(counter.get_total_flops())


def compare(workload: str, steps: int, strategies: list[str], repeats: int = 3, memory: bool = True) -> dict:
    """Time ``strategies`` (bench names) alternately on ``workload`` at ``steps`` inner steps."""
    from metakit.bench.environment import _git_commit
    from metakit.bench.plan_validation import _measure_in_child
    from metakit.bench.strategies import build_learner, entry
    from metakit.bench.workloads import WORKLOADS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    built = WORKLOADS[workload].build(torch.device("cpu"))
    learners = {name: build_learner(built, name, steps) for name in strategies}
    load_before = list(os.getloadavg())
    for learner in learners.values():  # warm-up: first-use costs, the allocator's first growth
        learner.meta_step(built.tasks)
    cpu: dict[str, list[float]] = {name: [] for name in strategies}
    wall: dict[str, list[float]] = {name: [] for name in strategies}
    for round_index in range(repeats):
        shift = round_index % len(strategies)
        for name in strategies[shift:] + strategies[:shift]:
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            learners[name].meta_step(built.tasks)
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
    flops = {name: _flops(learners[name], built.tasks) for name in strategies}
    base = strategies[0]
    rows = []
    for name in strategies:
        row = {
            "strategy": entry(name).label,
            "cpu_s": cpu[name],
            "wall_s": wall[name],
            "cpu_s_median": statistics.median(cpu[name]),
            "cpu_ratio": statistics.median(c / b for c, b in zip(cpu[name], cpu[base], strict=True)),
            "gflop": flops[name] / 1e9,
            "flop_ratio": flops[name] / flops[base],
        }
        if memory:
            measured = _measure_in_child(workload, entry(name).code, steps, timeout=1800)
            row["peak_mib"] = measured.get("measured_mib")
            row["memory_status"] = measured["status"]
        rows.append(row)
    if memory and rows[0].get("peak_mib"):
        for row in rows:
            if row.get("peak_mib") is not None:
                row["memory_ratio"] = row["peak_mib"] / rows[0]["peak_mib"]
    return {
        "workload": workload,
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
        "cpu": _cpu_model(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    from metakit.bench.environment import _cpu_model as model

    return f"{model()}, {os.cpu_count()} logical CPUs"


def _table(records: list[dict]) -> str:
    lines = [
        "# Strategies side by side",
        "",
        "One process per (workload, S), one torch thread: a warm-up meta-step of each strategy, then "
        "timed meta-steps alternating in rotating order. **CPU s**: median process CPU time of a "
        "meta-step; **× first**: median over rounds of the ratio to the first strategy of the same "
        "round. **GFLOP**: one meta-step counted by `FlopCounterMode` (matrix products and attention; "
        "elementwise work is not counted). **peak MiB**: the first meta-step's peak RSS increase in a "
        "fresh process (`MALLOC_MMAP_THRESHOLD_=131072`, as in the planner's validation). Produced by "
        "`python -m metakit.bench.side_by_side`.",
        "",
        "| run | workload | S | strategy | CPU s | × first | GFLOP | × first | peak MiB | × first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, record in enumerate(records, 1):
        for row in record["rows"]:
            peak, ratio = row.get("peak_mib"), row.get("memory_ratio")
            peak_cell = "–" if peak is None else f"{peak:,.0f}"
            ratio_cell = "–" if ratio is None else f"{ratio:.2f}"
            lines.append(
                f"| {run} | {record['workload']} | {record['steps']} | {row['strategy']} | {row['cpu_s_median']:.2f} "
                f"| {row['cpu_ratio']:.2f} | {row['gflop']:,.0f} | {row['flop_ratio']:.2f} "
                f"| {peak_cell} | {ratio_cell} |"
            )
    lines += [
        "",
        "| run | workload | S | rounds (per-round ratios to the first) | CPU | load before → after | commit "
        "| time (UTC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, record in enumerate(records, 1):
        first = record["rows"][0]["cpu_s"]
        spread = "; ".join(
            f"{row['strategy']} "
            + ", ".join(f"{c / b:.2f}" for c, b in zip(row["cpu_s"], first, strict=True))
            for row in record["rows"][1:]
        )
        before = "/".join(f"{x:.2f}" for x in record["load_average_before"])
        after = "/".join(f"{x:.2f}" for x in record["load_average_after"])
        lines.append(
            f"| {run} | {record['workload']} | {record['steps']} | {record['repeats']}: {spread} | {record['cpu']} "
            f"| {before} → {after} | {record['commit']} | {record['time_utc']} |"
        )
    return "\n".join(lines) + "\n"


def _records(path: Path) -> list[dict]:
    """Every run in ``path``, in the order they ran (a rerun adds rows; it replaces none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metakit.bench.side_by_side", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workload", required=True)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument(
        "--strategies", nargs="+", required=True, help="bench names; the first is the baseline"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/side-by-side.md"))
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from <out>.jsonl")
    args = parser.parse_args(argv)
    from metakit.bench.strategies import canonical_strategy
    from metakit.bench.workloads import WORKLOADS

    if args.workload not in WORKLOADS:
        parser.error(f"unknown workload {args.workload!r}; known: {', '.join(WORKLOADS)}")
    try:
        strategies = [canonical_strategy(name) for name in args.strategies]
    except ValueError as error:
        parser.error(str(error))
    records_path = args.out.with_suffix(".jsonl")
    if not args.table_only:
        for steps in args.steps:
            record = compare(args.workload, steps, strategies, args.repeats, memory=not args.no_memory)
            print(json.dumps(record), flush=True)
            with records_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
    args.out.write_text(_table(_records(records_path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
