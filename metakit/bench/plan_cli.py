"""``metakit plan``: which gradient modes fit a device, and how fast, before renting it.

Examples::

    metakit plan --workload bert-long --steps 1 5 10 --device a100-80gb
    metakit plan --workload mbert-priming mbert-maml --steps 1 5 10 --device t4 a10 a100-40gb a100-80gb
    metakit plan --workload mbert-maml --memory-gib 48 --tflops 90 --bandwidth-gbs 900

``mbert-priming`` and ``mbert-maml`` are the priming paper's model and meta-batch
(`metakit.bench.plan_paper`), built on fake tensors; the other names are ``metakit bench``'s workloads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "fits_table", "recommended_table", "run"]

PAPER = {"mbert-priming": "priming", "mbert-maml": "maml"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``metakit plan``'s options to ``parser``."""
    parser.add_argument(
        "--workload", nargs="+", default=["mbert-priming"], metavar="NAME",
        help="mbert-priming, mbert-maml (the priming paper's model and batch) or a `metakit bench` workload",
    )  # fmt: skip
    parser.add_argument(
        "--steps", nargs="+", type=int, default=[5], metavar="S", help="inner steps (default 5)"
    )
    parser.add_argument(
        "--device", nargs="+", default=None, metavar="NAME",
        help="known devices (default a100-80gb): t4, v100-16gb, v100-32gb, a10, l4, rtx4090, a100-40gb, "
        "a100-80gb, h100, h200, cpu",
    )  # fmt: skip
    parser.add_argument(
        "--memory-gib", type=float, help="a device of your own: its memory in GiB (with --tflops)"
    )
    parser.add_argument("--tflops", type=float, help="a device of your own: its dense FP32 rate in TFLOPS")
    parser.add_argument("--bandwidth-gbs", type=float, help="a device of your own: memory bandwidth in GB/s")
    parser.add_argument(
        "--checkpoint", type=int, help="segment length of the recomputed modes (default ceil(sqrt(S)))"
    )
    parser.add_argument(
        "--optimizer-state", type=int, default=2,
        help="outer-optimizer tensors per outer parameter counted in the total (Adam 2, default; SGD 0)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")


def run(args: argparse.Namespace) -> int:
    """Plan each workload at each S; print a table per plan and, for several devices, what fits where."""
    try:
        devices = _devices(args)
        names = [_workload(name) for name in args.workload]
        if any(s < 1 for s in args.steps):
            raise ValueError(f"--steps must be positive integers, got {args.steps}")
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sections = []
    for name in names:
        plans = []
        for steps in args.steps:
            plan = _plan(name, steps, devices[0], args)
            plans.append(plan)
            sections.append(f"## {name}, S = {steps}\n\n{plan}\n")
            print(sections[-1], flush=True)
        if len(devices) > 1:
            sections.append(f"## {name}: which modes fit where\n\n{fits_table(plans, devices)}\n")
            print(sections[-1], flush=True)
            sections.append(f"## {name}: recommended mode\n\n{recommended_table(plans, devices)}\n")
            print(sections[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(sections))
    return 0


def fits_table(plans, devices) -> str:
    """Markdown: one row per (S, mode), one column per device: fits with its time, or the total it needs."""
    header = "| S | mode | total | " + " | ".join(d.name for d in devices) + " |"
    lines = [header, "|---:|---|---:|" + "---|" * len(devices)]
    for plan in plans:
        on = [plan.on(d) for d in devices]
        for index, row in enumerate(plan.rows):
            if not row.planned:
                lines.append(
                    f"| {plan.steps} | {row.mode} | | {' | '.join('not planned' for _ in devices)} |"
                )
                continue
            cells = []
            for device_plan in on:
                cell = device_plan.rows[index]
                mark = "**yes**" if cell is device_plan.recommended else "yes"
                cells.append(f"{mark}, {_seconds(cell.seconds)}" if cell.fits else "no")
            lines.append(
                f"| {plan.steps} | {row.mode} | {row.total_bytes / 2**30:.1f} GiB | {' | '.join(cells)} |"
            )
    lines += ["", "**yes**: the recommended mode on that device (the fastest exact mode that fits)."]
    return "\n".join(lines)


def recommended_table(plans, devices) -> str:
    """Markdown: the recommended mode and its time for each S (rows) on each device (columns)."""
    lines = ["| S | " + " | ".join(d.name for d in devices) + " |", "|---:|" + "---|" * len(devices)]
    for plan in plans:
        cells = []
        for device in devices:
            choice = plan.on(device).recommended
            cells.append("nothing fits" if choice is None else f"{choice.mode}, {_seconds(choice.seconds)}")
        lines.append(f"| {plan.steps} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _devices(args):
    from metakit.planning.devices import Device, get_device

    custom = (args.memory_gib, args.tflops)
    if any(v is not None for v in custom):
        if None in custom:
            raise ValueError("a device of your own needs both --memory-gib and --tflops")
        own = Device(args.memory_gib, args.tflops, bandwidth_gbs=args.bandwidth_gbs, name="your device")
        return [own, *(get_device(name) for name in args.device or [])]
    return [get_device(name) for name in args.device or ["a100-80gb"]]


def _workload(name: str) -> str:
    if name in PAPER:
        return name
    from metakit.bench.workloads import WORKLOADS

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join([*PAPER, *WORKLOADS])}")
    return name


def _plan(name: str, steps: int, device, args):
    import metakit as mk

    kwargs = {"checkpoint": args.checkpoint, "optimizer_state": args.optimizer_state}
    if name in PAPER:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from metakit.bench.plan_paper import mbert_learner, paper_tasks

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        model, learner = mbert_learner(PAPER[name], steps, mode)
        return mk.plan(model, learner, paper_tasks(mode), device, **kwargs)
    from metakit.bench.plan_validation import predict_learner

    built, learner = predict_learner(name, steps)
    return mk.plan(built.model, learner, built.tasks, device, **kwargs)


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.3g} s" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"
