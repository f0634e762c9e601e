"""Meta-training throughput (tasks per second) in one process and across processes (``Distributed``).

    python -m metakit.bench.throughput                      # sine and priming; 1 and 2 processes, CPU
    python -m metakit.bench.throughput --workloads sine --processes 1 2 4
    python -m metakit.bench.throughput --device cuda --processes 1   # one process per GPU

Each configuration starts its processes afresh (``torch.multiprocessing.spawn``, gloo on CPU, nccl
on CUDA), builds the workload of ``benchmarks/workloads.py`` on every rank, runs warm-up meta-steps
(meta-step, outer Adam step), then times ``--steps`` meta-steps between two barriers. Every
configuration is repeated ``--repeats`` times, round-robin; the table gives the median tasks/s
and the speed-up over one single-threaded process. One process with as many threads as there are processes is
measured too, since that is what the cores would do otherwise. Writes ``throughput.json`` and
``throughput.md`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchopt

import metakit as mk
from metakit.bench.environment import describe_environment
from metakit.bench.workloads import WORKLOADS
from metakit.executors import Distributed

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Setting:
    """What one measured configuration runs: a workload, its strategy and meta-batch, and the sharing."""

    workload: str
    strategy: str
    inner_steps: int
    tasks_per_step: int
    processes: int
    threads: int


#: The two workloads: MAML's sine (25 tasks, exact second order) and priming on the small BERT.
PLANS = {
    "sine": dict(strategy="second-order", inner_steps=1, tasks_per_step=25, steps=40, warmup=3),
    "priming": dict(strategy="first-order", inner_steps=5, tasks_per_step=4, steps=8, warmup=1),
}
STRATEGIES = {"second-order": mk.SecondOrder, "first-order": mk.FirstOrder}


def build_learner(setting: Setting, device: torch.device, executor) -> tuple[mk.MetaLearner, list[mk.Task]]:
    """The workload's model and a learner over it; the meta-batch repeats the workload's tasks."""
    from metakit import recipes

    built = WORKLOADS[setting.workload].build(device)
    strategy = STRATEGIES[setting.strategy]()
    optimizer = torchopt.sgd(lr=built.inner_lr)
    if built.priming:
        learner = recipes.priming(
            built.model,
            built.loss_fn,
            pe=built.pe,
            head=built.head,
            steps=setting.inner_steps,
            strategy=strategy,
        )
        if executor is not None:  # recipes take no executor= yet
            executor.check(strategy)
            learner.executor = executor
    else:
        learner = mk.MetaLearner(
            built.model,
            built.loss_fn,
            inner=mk.InnerLoop(built.inner, optimizer, steps=setting.inner_steps),
            outer_params=built.outer,
            strategy=strategy,
            executor=executor,
        )
    tasks = [built.tasks[i % len(built.tasks)] for i in range(setting.tasks_per_step)]
    return learner, tasks


def worker(
    rank: int, setting: Setting, device_name: str, steps: int, warmup: int, init: str, out: str
) -> None:
    torch.set_num_threads(setting.threads)
    distributed = setting.processes > 1
    if device_name == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_name, rank) if device_name == "cuda" else torch.device("cpu")
    if distributed:
        backend = "nccl" if device_name == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"file://{init}", rank=rank, world_size=setting.processes
        )
    learner, tasks = build_learner(setting, device, Distributed() if distributed else None)
    outer = torch.optim.Adam(learner.outer_parameters(), lr=1e-4)

    def meta_step() -> None:
        learner.meta_step(tasks)
        outer.step()
        outer.zero_grad()

    def synchronize() -> None:
        if device_name == "cuda":
            torch.cuda.synchronize()
        if distributed:
            dist.barrier()

    for _ in range(warmup):
        meta_step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        meta_step()
    synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    if distributed:
        dist.destroy_process_group()


def measure(setting: Setting, device: str, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` meta-steps of ``setting`` in freshly started processes."""
    with tempfile.TemporaryDirectory() as scratch:
        out = f"{scratch}/seconds.json"
        args = (setting, device, steps, warmup, f"{scratch}/init", out)
        mp.spawn(worker, args=args, nprocs=setting.processes, join=True)
        return json.loads(Path(out).read_text())["seconds"]


def settings_for(workload: str, processes: list[int]) -> list[Setting]:
    """Each process count with one thread per process, plus one process using that many threads."""
    plan = PLANS[workload]
    common = dict(
        workload=workload,
        strategy=plan["strategy"],
        inner_steps=plan["inner_steps"],
        tasks_per_step=plan["tasks_per_step"],
    )
    out = [Setting(**common, processes=n, threads=1) for n in processes]
    out += [Setting(**common, processes=1, threads=n) for n in processes if n > 1]
    return out


def markdown(records: list[dict], environment: dict) -> str:
    machine = environment["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items() if v)
    lines = [
        "# Meta-training throughput: one process and `Distributed` across processes",
        "",
        f"- date: {environment['date_utc']}; commit {environment['git_commit']}",
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gib']} GiB",
        f"- device: {environment['device']}" + (f" ({environment['gpu']})" if "gpu" in environment else ""),
        f"- {versions}; Python {environment['python']}",
        "- load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in environment["load_average_at_start"])
        + ", at end "
        + "/".join(f"{x:.2f}" for x in environment["load_average_at_end"]),
        "",
        "Tasks/s: median over repeats of (meta-steps × tasks per meta-step) / seconds, each repeat in "
        "freshly started processes after warm-up meta-steps; a meta-step includes the outer Adam step. "
        "Speed-up: over one process with one thread on the same workload.",
        "",
        "| workload | strategy | inner steps | tasks/meta-step | processes | threads/process | tasks/s | "
        "speed-up | repeats (tasks/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        repeats = ", ".join(f"{x:.1f}" for x in r["tasks_per_s_repeats"])
        lines.append(
            f"| {r['workload']} | {r['strategy']} | {r['inner_steps']} | {r['tasks_per_step']} | "
            f"{r['processes']} | {r['threads']} | {r['tasks_per_s']:.1f} | {r['speedup']:.2f} | {repeats} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", nargs="+", choices=sorted(PLANS), default=["sine", "priming"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="timed meta-steps (default: per workload)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="throughput", help="file stem of the outputs")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.processes) or 1 not in args.processes:
        parser.error("--processes needs positive counts including 1 (the baseline of the speed-up).")
    if args.device == "cuda" and max(args.processes) > max(torch.cuda.device_count(), 0):
        parser.error(f"--device cuda runs one process per GPU; this machine has {torch.cuda.device_count()}.")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    environment = describe_environment(args.device, threads=1)
    plan_settings = [
        (setting, args.steps or PLANS[workload]["steps"], PLANS[workload]["warmup"])
        for workload in args.workloads
        for setting in settings_for(workload, args.processes)
        if not (args.device == "cuda" and setting.threads > 1)
    ]
    rates: dict[Setting, list[float]] = {setting: [] for setting, _, _ in plan_settings}
    # Round-robin over the settings, so that load from other processes hits them alike.
    for repeat in range(args.repeats):
        for setting, steps, warmup in plan_settings:
            seconds = measure(setting, args.device, steps, warmup)
            rates[setting].append(steps * setting.tasks_per_step / seconds)
            print(
                f"repeat {repeat + 1}/{args.repeats}: {setting.workload}, {setting.processes} process(es) × "
                f"{setting.threads} thread(s): {rates[setting][-1]:.1f} tasks/s",
                flush=True,
            )
    records = []
    for setting, steps, _ in plan_settings:
        baseline = statistics.median(rates[replace(setting, processes=1, threads=1)])
        rate = statistics.median(rates[setting])
        records.append(
            {
                **asdict(setting),
                "timed_meta_steps": steps,
                "tasks_per_s": rate,
                "tasks_per_s_repeats": rates[setting],
                "speedup": rate / baseline,
            }
        )
    environment["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"environment": environment, "records": records}, indent=2)
    )
    (args.out / f"{args.name}.md").write_text(markdown(records, environment))
    print(markdown(records, environment))


if __name__ == "__main__":
    main()
