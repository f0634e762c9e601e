"""Validate ``mk.plan`` on this CPU: predicted against measured peak memory of the first meta-step.

For every bench workload, inner-step count and planned mode, the prediction is made in this process
(a fake trace, nothing runs) and the measurement in a fresh process: the peak RSS increase of the
first meta-step (`metakit.bench.memory.PeakRSS`, as ``metakit bench`` measures it), with one
torch thread. A configuration whose step the planner itself predicts to take longer than
``--max-seconds`` on this CPU is not measured, and the table says so. Run::

    python -m metakit.bench.plan_validation --out benchmarks/results/plan-validation.md
    python -m metakit.bench.plan_validation --workloads sine bert --steps 1 5   # a part

Records go to ``<out>.jsonl`` as they come (a rerun skips what is there); the table is rebuilt from
them at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "measure_one", "predict", "predict_learner"]

MIB = 2**20
WORKLOADS = ("sine", "bert", "priming", "bert-long", "priming-long")
TOLERANCE = 0.25
#: What a peak-RSS increase resolves: blocks under the 128 KiB mmap threshold come from a heap the
#: warm-up step already grew, so a step that allocates less than about this much shows (almost) none of
#: it. A row whose prediction is this close to the measurement passes whatever its relative error.
RESOLUTION_MIB = 1.0


def _learner(built, strategy, steps: int):
    """The learner `metakit.bench.strategies.build_learner` builds, with ``strategy`` in it."""
    from metakit.bench.strategies import workload_learner

    return workload_learner(built, strategy, steps)


def predict_learner(workload: str, steps: int):
    """A bench workload built on the CPU and its learner (FirstOrder; the plan replaces the strategy)."""
    import metakit as mk
    from metakit.bench.workloads import WORKLOADS as BENCH

    built = BENCH[workload].build(torch.device("cpu"))
    return built, _learner(built, mk.FirstOrder(), steps)


def predict(workload: str, steps: int, labels: list[str] | None = None):
    """The plan of ``workload`` at ``steps`` inner steps on this CPU (one torch thread).

    ``labels``: plan only these of `metakit.planning.default_modes` (a trace of a long workload takes
    minutes per mode).
    """
    import metakit as mk
    from metakit.planning import default_modes

    built, learner = predict_learner(workload, steps)
    modes = [m for m in default_modes(steps) if labels is None or m.label in labels]
    return mk.plan(built.model, learner, built.tasks, device="cpu", modes=modes)


def measure_one(workload: str, mode: str, steps: int, warm_up: bool = True) -> dict:
    """Peak RSS increase and time of the first meta-step of one configuration, in this process.

    With ``warm_up``, one meta-step of the same mode on the sine workload runs first, so the code the
    mode uses for the first time (lazily imported modules, kernels' one-time buffers) is loaded
    before the measurement, which then sees the step's tensors and the allocator only.
    """
    from metakit.bench.memory import PeakRSS
    from metakit.bench.workloads import WORKLOADS as BENCH
    from metakit.planning import default_modes

    candidates = [m for k in (None, *range(1, steps + 1)) for m in default_modes(steps, checkpoint=k)]
    matching = [m for m in candidates if m.label == mode]
    if not matching:
        raise ValueError(
            f"unknown mode {mode!r} at S={steps}; known: {sorted({m.label for m in candidates})}"
        )
    entry = matching[0]
    if warm_up:
        sine = BENCH["sine"].build(torch.device("cpu"))
        _learner(sine, entry.build(), steps).meta_step(sine.tasks)
        del sine
    built = BENCH[workload].build(torch.device("cpu"))
    learner = _learner(built, entry.build(), steps)
    gc.collect()
    with PeakRSS() as rss:
        started = time.perf_counter()
        learner.meta_step(built.tasks)
        seconds = time.perf_counter() - started
    return {"measured_mib": rss.increase / MIB, "measured_s": seconds, "rss_method": rss.method}


#: glibc's allocator, by default, raises its mmap threshold (up to 32 MiB) each time a mapped block is
#: freed, after which blocks below it come from the heap and freed ones stay resident: RSS then runs
#: 30-50 % above the live bytes on activation-heavy steps, by an amount that depends on the order of
#: allocations. A fixed threshold returns every block of 128 KiB or more to the system when freed, so
#: the peak RSS is the peak of what the step holds, as a GPU's allocator reports it.
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _measure_in_child(workload: str, mode: str, steps: int, timeout: float) -> dict:
    env = {**os.environ, **MEASURE_ENV}
    command = [sys.executable, "-m", "metakit.bench.plan_validation", "--measure", workload, mode, str(steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": "error: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _git_commit() -> str | None:
    from metakit.bench.environment import _git_commit as commit

    return commit()


def _records(path: Path) -> list[dict]:
    """The records of ``path``, one per configuration: a measured one over any other, else the last."""
    if not path.exists():
        return []
    kept: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        key = (record["workload"], record["steps"], record["mode"])
        if kept.get(key, {}).get("status") != "ok":
            kept[key] = record
    return list(kept.values())


def run(workloads, steps_list, out: Path, max_seconds: float) -> None:
    """Predict and measure every configuration not yet in ``<out>.jsonl``, then write the table."""
    records_path = out.with_suffix(".jsonl")
    done = {(r["workload"], r["steps"], r["mode"]) for r in _records(records_path)}
    # Every workload at the smallest S first: tracing and measuring grow with S.
    for steps in steps_list:
        for workload in workloads:
            missing = [m for m in _labels(steps) if (workload, steps, m) not in done]
            if not missing:
                continue
            started = time.perf_counter()
            planned = predict(workload, steps, missing)
            trace_s = (time.perf_counter() - started) / len(planned.rows)
            for row in planned.rows:
                if row.mode not in missing:  # done, or the learner's own strategy, which the plan adds
                    continue
                record = {
                    "workload": workload,
                    "steps": steps,
                    "mode": row.mode,
                    "predicted_mib": None if row.step_bytes is None else row.step_bytes / MIB,
                    "predicted_s": row.seconds,
                    "trace_s": trace_s,
                    "load_average": list(os.getloadavg()),
                    # The tree is shared: the commit (and whether it was dirty) says which code both sides ran.
                    "commit": _git_commit(),
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                if not row.planned:
                    record["status"] = row.note
                elif row.seconds > max_seconds:
                    record["status"] = (
                        f"not measured: predicted {row.seconds:.0f} s on this CPU > {max_seconds:.0f} s"
                    )
                else:
                    # The prediction is for an idle core; on a shared one a step takes 2-3 times as long.
                    record.update(_measure_in_child(workload, row.mode, steps, timeout=3 * max_seconds))
                print(json.dumps(record), flush=True)
                with records_path.open("a") as file:
                    file.write(json.dumps(record) + "\n")
    out.write_text(_table(_records(records_path)))


def _labels(steps: int) -> list[str]:
    from metakit.planning import default_modes

    return [m.label for m in default_modes(steps)]


def _family(mode: str) -> str:
    """The mode without its segment length: what its first use loads does not depend on k."""
    return re.sub(r"checkpoint=\d+", "checkpoint=k", mode)


#: The (workload, S) whose rows fit `rss_model`: they pass by construction and validate nothing.
CALIBRATION = {("sine", 1), ("bert", 1)}

#: A step that allocates less is all first-use cost: its raw error says nothing about the bytes.
RAW_FLOOR_MIB = 10.0


def rss_model(records: list[dict]) -> tuple[dict[str, float], float]:
    """RSS = ratio × predicted bytes + first-use cost of the mode, calibrated on sine and bert at S=1.

    The measurement runs a warm-up step of the same mode first (`measure_one`), so what the mode
    loads on first use (code pages, lazily imported modules: torch.func for forward mode) is mostly
    paid before it; sine's steps allocate under 1 MiB, so its measured increase is what remains of
    that cost. The ratio is what the allocator and kernels add to the traced bytes (small with the
    fixed mmap threshold of `MEASURE_ENV`): bert at S=1, median over modes.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    first_use = {
        _family(r["mode"]): max(0.0, r["measured_mib"] - r["predicted_mib"])
        for r in ok
        if (r["workload"], r["steps"]) == ("sine", 1)
    }
    ratios = sorted(
        (r["measured_mib"] - first_use.get(_family(r["mode"]), 0.0)) / r["predicted_mib"]
        for r in ok
        if (r["workload"], r["steps"]) == ("bert", 1)
    )
    return first_use, ratios[len(ratios) // 2] if ratios else 1.0  # 1.0 until bert at S=1 is measured


def _passes(record: dict) -> bool:
    """Within the tolerance, or within what the measurement resolves."""
    close = abs(record["modelled_mib"] - record["measured_mib"]) <= RESOLUTION_MIB
    return close or (record["error"] is not None and abs(record["error"]) <= TOLERANCE)


def _order(record: dict) -> tuple:
    labels = [_family(label) for label in _labels(record["steps"])]
    family = _family(record["mode"])
    return (
        WORKLOADS.index(record["workload"]) if record["workload"] in WORKLOADS else len(WORKLOADS),
        record["steps"],
        labels.index(family) if family in labels else len(labels),
    )


def _table(records: list[dict]) -> str:
    from metakit.bench.environment import describe_environment

    environment = describe_environment("cpu", 1)
    records = sorted(records, key=_order)
    first_use, ratio = rss_model(records)
    lines = [
        "# mk.plan: predicted against measured peak memory on this CPU",
        "",
        f"Machine: {environment['machine']['cpu']}, {environment['machine']['logical_cpus']} logical CPUs, "
        f"{environment['machine']['memory_gib']} GiB; torch {environment['versions']['torch']}, one torch thread; "
        f"table written at commit {environment['git_commit']}, {environment['date_utc']}. The machine was shared "
        "with other jobs ('load': its 1-minute load average when the row was measured): that slows the "
        "measured times, not the memory. The working tree was shared with ongoing changes: a row's prediction and "
        "measurement ran the code of its time (records carry their commit and time where the runner recorded them).",
        "",
        'Predicted: the bytes the meta-step allocates, from a fake-tensor trace (`mk.plan(..., device="cpu")`). '
        "Measured: the peak RSS increase of the workload's first meta-step in a fresh process (`PeakRSS`, as "
        "`metakit bench`), after one warm-up meta-step of the same mode on the sine workload (so code the mode "
        "loads on first use is not counted as the step's memory), with glibc's mmap threshold fixed at 128 KiB "
        "(`MALLOC_MMAP_THRESHOLD_=131072`: freed blocks go back to the system, so RSS follows what the step "
        "holds, as a GPU allocator's peak does). With glibc's default, dynamic threshold RSS ran 30-50 % above the "
        "live bytes on activation-heavy steps: `plan-validation-default-malloc.md` is that first table (no "
        f"warm-up, default allocator). Error = predicted RSS / measured - 1; a row passes within ±{TOLERANCE:.0%}, "
        f"or within {RESOLUTION_MIB:.0f} MiB of the measurement (what an RSS increase resolves: sine's steps allocate "
        "0.2-0.4 MiB in blocks the heap already holds, so its measured increases are 0-0.1 MiB).",
        "",
        f"RSS model (`rss_model`): predicted RSS = {ratio:.2f} × predicted bytes + the mode's first-use cost "
        f"({', '.join(f'{k}: {v:.1f} MiB' for k, v in first_use.items())}). The costs are sine's measured "
        "increases at S=1 after the warm-up (its steps allocate under 1 MiB), the ratio is the median over modes "
        "of bert at S=1. "
        "Those rows are marked *calibration*: the model is fitted to them, so they validate nothing and are "
        "left out of the counts below; every other row validates it. 'raw' is the error of the predicted bytes alone.",
        "",
        "| workload | S | mode | predicted bytes | predicted RSS | measured | error | raw | predicted time | measured time | load | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    validating, calibrating, not_measured = [], [], []
    for r in records:
        measured = r.get("measured_mib")
        raw = r.get("predicted_mib")
        predicted = None if raw is None else ratio * raw + first_use.get(_family(r["mode"]), 0.0)
        r["modelled_mib"] = predicted
        r["error"] = predicted / measured - 1 if measured and predicted is not None else None
        r["raw_error"] = raw / measured - 1 if measured and raw is not None else None
        status = r.get("status", "")
        if status == "ok" and (r["workload"], r["steps"]) in CALIBRATION:
            status = "calibration"
            calibrating.append(r)
        elif status == "ok":
            status = "ok" if _passes(r) else "**miss**"
            validating.append(r)
        else:
            not_measured.append(r)
        lines.append(
            f"| {r['workload']} | {r['steps']} | {r['mode']} | {_mib(raw)} | {_mib(predicted)} | {_mib(measured)} | "
            f"{_pct(r['error'])} | {_pct(r['raw_error'])} | {_s(r.get('predicted_s'))} | {_s(r.get('measured_s'))} | "
            f"{r['load_average'][0]:.1f} | {status} |"
        )
    lines += ["", *_summary(validating, calibrating, not_measured)]
    if missing := _missing(records):
        lines += [
            "",
            f"Not run ({len(missing)}; no record yet: the run stopped before them, a rerun measures them): "
            + "; ".join(missing)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _summary(validating: list[dict], calibrating: list[dict], not_measured: list[dict]) -> list[str]:
    """The counts, the worst validating error, every miss, the raw bias and what was not measured."""
    lines = [
        f"{len(validating) + len(calibrating)} configurations measured: {len(calibrating)} calibration, "
        f"{len(validating)} validating; {len(not_measured)} skipped (not planned, or predicted slower than --max-seconds)."
    ]
    if validating:
        resolved = [r for r in validating if r["measured_mib"] > RESOLUTION_MIB and r["error"] is not None]
        resolved = resolved or [r for r in validating if r["error"] is not None] or validating
        worst = max(resolved, key=lambda r: abs(r["error"]))
        misses = [r for r in validating if not _passes(r)]
        lines[-1] += (
            f" Of the validating rows, {len(misses)} miss (outside ±{TOLERANCE:.0%} and more than "
            f"{RESOLUTION_MIB:.0f} MiB off); worst error of the rows measured above {RESOLUTION_MIB:.0f} MiB "
            f"{_pct(worst['error'])} ({_config(worst)})."
        )
        if misses:
            lines += ["", "Misses:", ""]
            lines += [f"- {_config(r)}: {r['error']:+.1%}" for r in misses]
    sized = [r for r in validating + calibrating if r["predicted_mib"] >= RAW_FLOOR_MIB]
    if sized:
        raw = sorted(r["raw_error"] for r in sized)
        lines += [
            "",
            f"Raw bytes alone, over the {len(sized)} measured rows whose step allocates at least "
            f"{RAW_FLOOR_MIB:.0f} MiB: median error {_pct(raw[len(raw) // 2])}, from {_pct(raw[0])} to "
            f"{_pct(raw[-1])}"
            + (
                ": the bytes are systematically below the RSS increase (the allocator's own overhead, kernels' "
                "workspaces the trace does not see)."
                if raw[-1] < 0
                else "."
            ),
        ]
    if not_measured:
        lines += ["", "Not measured:", ""]
        lines += [f"- {_config(r)}: {r.get('status', '')}" for r in not_measured]
    return lines


def _missing(records: list[dict], steps_list: tuple[int, ...] = (1, 5, 10)) -> list[str]:
    """The configurations of every workload at ``steps_list`` with no record, grouped per (workload, S)."""
    have = {(r["workload"], r["steps"], _family(r["mode"])) for r in records}
    missing = []
    for steps in steps_list:
        for workload in WORKLOADS:
            modes = [m for m in _labels(steps) if (workload, steps, _family(m)) not in have]
            if len(modes) == len(_labels(steps)):
                missing.append(f"{workload} at S={steps}, every mode")
            elif modes:
                missing.append(f"{workload} at S={steps}, {', '.join(modes)}")
    return missing


def _config(record: dict) -> str:
    return f"{record['workload']}, S={record['steps']}, {record['mode']}"


def _pct(value) -> str:
    return "" if value is None else f"{value:+.0%}"


def _mib(value) -> str:
    return "" if value is None else f"{value:,.1f} MiB"


def _s(value) -> str:
    return "" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metakit.bench.plan_validation", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--measure", nargs=3, metavar=("WORKLOAD", "MODE", "S"), help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--out", type=Path, default=Path("plan-validation.md"))
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="skip configurations predicted slower"
    )
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from <out>.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.measure:
        workload, mode, steps = args.measure
        print(json.dumps(measure_one(workload, mode, int(steps))))
        return 0
    if args.table_only:
        args.out.write_text(_table(_records(args.out.with_suffix(".jsonl"))))
        return 0
    run(args.workloads, args.steps, args.out, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
