"""Records to figures: time vs S, memory vs S, fidelity vs cost, and the model-size sweep."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from benchmarks.grid import GROUPS
from benchmarks.report import memory_column
from benchmarks.strategies import STRATEGIES, strategy_label

__all__ = ["write_plots"]

_MARKERS = dict(zip(STRATEGIES, "osD^v", strict=True))
_COLORS = {name: f"C{i}" for i, name in enumerate(STRATEGIES)}  # the same colour for a strategy everywhere


def _legend(figure, reference: bool = False) -> None:
    """One legend for the whole figure, listing every strategy whether or not a panel has it."""
    handles = [
        plt.Line2D([], [], marker=_MARKERS[s], color=_COLORS[s], label=strategy_label(s)) for s in STRATEGIES
    ]
    if reference:
        handles.append(
            plt.Line2D([], [], ls=":", marker="o", mfc="none", color="gray", label="hand-written loop")
        )
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)


def _log(axis, which: str = "y") -> None:
    """Log scale with plain numbers at a few ticks (matplotlib's minor labels overlap on short ranges)."""
    target = axis.yaxis if which == "y" else axis.xaxis
    (axis.set_yscale if which == "y" else axis.set_xscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FormatStrFormatter("%g"))
    target.set_minor_formatter(NullFormatter())


def _ok(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def _by_workload(records: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in _ok(records):
        groups[record["config"]["workload"]].append(record)
    return dict(groups)


def _series(records: Sequence[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{strategy: (S values, key values)}`` sorted by S, skipping records without ``key``."""
    points: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in records:
        if record.get(key) is not None:
            points[record["config"]["strategy"]].append((record["config"]["steps"], record[key]))
    return {s: tuple(map(list, zip(*sorted(p), strict=True))) for s, p in points.items()}


def _axes_grid(n: int, rows: int = 1, height: float = 3.4):
    figure, axes = plt.subplots(rows, n, figsize=(4.2 * n, height * rows), squeeze=False)
    return figure, axes


def _plot_vs_steps(axis, records: Sequence[dict], key: str, reference_key: str | None = None) -> None:
    for strategy, (steps, values) in _series(records, key).items():
        axis.plot(steps, values, marker=_MARKERS[strategy], color=_COLORS[strategy])
    if reference_key:
        for strategy, (steps, values) in _series(records, reference_key).items():
            axis.plot(steps, values, ls=":", color=_COLORS[strategy], marker=_MARKERS[strategy], mfc="none")
    axis.set_xlabel("inner steps S")
    _log(axis, "y")
    axis.grid(alpha=0.3, which="both")


def _time_vs_steps(by_workload: dict[str, list[dict]], path: Path) -> None:
    figure, axes = _axes_grid(len(by_workload))
    for axis, (workload, records) in zip(axes[0], by_workload.items(), strict=True):
        _plot_vs_steps(axis, records, "time_ms", "reference_time_ms")
        axis.set_title(workload)
        axis.set_ylabel("ms per meta-step")
    _legend(figure, reference=True)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _memory_vs_steps(
    by_workload: dict[str, list[dict]], path: Path, memory_key: str, memory_name: str
) -> None:
    figure, axes = _axes_grid(len(by_workload), rows=2)
    for column, (workload, records) in enumerate(by_workload.items()):
        _plot_vs_steps(axes[0][column], records, "saved_mib")
        axes[0][column].set_title(workload)
        axes[0][column].set_ylabel("saved for backward, MiB")
        _plot_vs_steps(axes[1][column], records, memory_key)
        axes[1][column].set_ylabel(f"peak {memory_name}, MiB")
    _legend(figure)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _fidelity_vs_cost(by_workload: dict[str, list[dict]], path: Path) -> None:
    figure, axes = _axes_grid(len(by_workload))
    for axis, (workload, records) in zip(axes[0], by_workload.items(), strict=True):
        exact_time = {
            r["config"]["steps"]: r["time_ms"] for r in records if r["config"]["strategy"] == "second-order"
        }
        for record in records:
            config = record["config"]
            if record.get("cosine") is None or config["steps"] not in exact_time:
                continue
            x = record["time_ms"] / exact_time[config["steps"]]
            strategy = config["strategy"]
            axis.scatter(x, record["cosine"], marker=_MARKERS[strategy], color=_COLORS[strategy], s=40)
            axis.annotate(
                f"S={config['steps']}",
                (x, record["cosine"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        axis.set_title(workload)
        _log(axis, "x")
        axis.set_xlabel("time / SecondOrder's time (same S)")
        axis.set_ylabel("cosine to exact meta-gradient")
        axis.grid(alpha=0.3, which="both")
    _legend(figure)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _size_sweep(records: Sequence[dict], path: Path) -> bool:
    sweep = [r for r in _ok(records) if r["config"]["workload"] in GROUPS["sweep"]]
    sizes = {r["config"]["workload"] for r in sweep}
    if len(sizes) < 2:
        return False
    figure, axes = _axes_grid(2)
    for axis, key, label in (
        (axes[0][0], "time_ms", "ms per meta-step"),
        (axes[0][1], "saved_mib", "saved MiB"),
    ):
        lines: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for record in sweep:
            config = record["config"]
            lines[(config["strategy"], config["steps"])].append(
                (record["workload_info"]["params"] / 1e6, record[key])
            )
        for (strategy, steps), points in sorted(lines.items()):
            if len(points) < 2:  # measured at one size only: not part of the sweep
                continue
            xs, ys = zip(*sorted(points), strict=True)
            style = "-" if steps == min(s for _, s in lines) else "--"
            axis.plot(
                xs,
                ys,
                style,
                marker=_MARKERS[strategy],
                color=_COLORS[strategy],
                label=f"{strategy_label(strategy)} S={steps}",
            )
        _log(axis, "x")
        _log(axis, "y")
        axis.set_xlabel("parameters (millions; BERT hidden 128/256/512)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_plots(records: Sequence[dict], out_dir: Path, device: str) -> list[Path]:
    """Write the figures for ``records`` into ``out_dir``; return the paths written."""
    plt.switch_backend("Agg")  # files only, also on machines with a display
    by_workload = _by_workload(records)
    sizes = [name for name in GROUPS["sweep"] if name in by_workload]
    if len(sizes) >= 2 and len(by_workload) > len(sizes):  # the other sizes get their own figure
        by_workload = {k: v for k, v in by_workload.items() if k not in sizes or k == "bert"}
    if not by_workload:
        return []
    memory_key, memory_name = memory_column(device)
    paths = [out_dir / "time_vs_steps.png", out_dir / "memory_vs_steps.png", out_dir / "fidelity_vs_cost.png"]
    _time_vs_steps(by_workload, paths[0])
    _memory_vs_steps(by_workload, paths[1], memory_key, memory_name)
    _fidelity_vs_cost(by_workload, paths[2])
    if _size_sweep(records, out_dir / "size_sweep.png"):
        paths.append(out_dir / "size_sweep.png")
    return paths
