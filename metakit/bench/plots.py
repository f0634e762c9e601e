"""Records to figures: time vs S, memory vs S (exact modes and FirstOrder), fidelity vs cost, size sweep.

A strategy keeps one colour, marker and line style in every figure, derived from its position in
`metakit.bench.strategies.STRATEGIES` (any number of entries). Lines of different strategies are
nudged apart along S so that equal values (SecondOrder and Truncated(1) at S=1) stay visible; axes
start at zero unless the values span more than a decade, and a cosine axis always spans at least
0.9–1.0, so that small differences are not blown up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, NullFormatter, NullLocator

from metakit.bench.config import MEASURED
from metakit.bench.grid import GROUPS
from metakit.bench.report import memory_column
from metakit.bench.strategies import EXACT_REFERENCE, STRATEGIES, entry, strategy_label

__all__ = ["strategy_styles", "write_plots"]

_MARKERS = "osD^v<>pPXh*"
_LINESTYLES = ("-", "--", "-.", (0, (8, 3)), (0, (5, 1, 1, 1, 1, 1)))  # dotted: the hand-written loop
_NUDGE = 0.035  # relative shift along a log S axis between neighbouring strategies
_DPI = 120


@dataclass(frozen=True)
class Style:
    """How one strategy is drawn."""

    color: str
    marker: str
    linestyle: str | tuple
    label: str


def strategy_styles(names: Iterable[str]) -> dict[str, Style]:
    """A distinct style per strategy: table entries by their position, unknown names (old records) after."""
    table = [e.name for e in STRATEGIES]
    extra = sorted(set(names) - set(table))
    return {
        name: Style(
            color=f"C{i % 10}",
            marker=_MARKERS[i % len(_MARKERS)],
            linestyle=_LINESTYLES[(i // 2) % len(_LINESTYLES)],
            label=strategy_label(name),
        )
        for i, name in enumerate(table + extra)
    }


def _ok(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r["status"] in MEASURED]


def _strategies(records: Sequence[dict]) -> list[str]:
    """Strategies present in ``records``, in table order."""
    present = {r["config"]["strategy"] for r in records}
    return [name for name in strategy_styles(present) if name in present]


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


def _steps_axis(axis, steps: Iterable[int]) -> None:
    """Log S axis labelled at exactly the measured S values (a single S gets a sensible width)."""
    steps = sorted(set(steps))
    if not steps:
        return
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator(steps))
    axis.xaxis.set_major_formatter(FormatStrFormatter("%d"))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlim(steps[0] / 1.4, steps[-1] * 1.4)
    axis.set_xlabel("inner steps S")


def _value_axis(axis, values: Sequence[float], label: str) -> None:
    """Linear from zero, or log with plain numbers where the values span more than a decade."""
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 15:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    else:
        axis.set_ylim(bottom=0, top=1.1 * max(positive, default=1.0))
    axis.set_ylabel(label)
    axis.grid(alpha=0.3, which="major")


def _plot_vs_steps(
    axis, records: Sequence[dict], key: str, styles: dict[str, Style], reference_key: str | None = None
) -> list[float]:
    """Draw one line per strategy, nudged apart along S; return every value drawn (for the y axis)."""
    series = _series(records, key)
    order = [s for s in styles if s in series]
    drawn: list[float] = []
    for position, strategy in enumerate(order):
        steps, values = series[strategy]
        nudge = 1 + _NUDGE * (position - (len(order) - 1) / 2)
        style = styles[strategy]
        xs = [s * nudge for s in steps]
        axis.plot(xs, values, color=style.color, marker=style.marker, ls=style.linestyle, ms=5)
        drawn += values
        if reference_key:
            reference = dict(zip(*_series(records, reference_key).get(strategy, ([], [])), strict=True))
            if reference:
                axis.plot(
                    [s * nudge for s in reference],
                    list(reference.values()),
                    ls=":",
                    color=style.color,
                    marker=style.marker,
                    mfc="none",
                    ms=5,
                )
                drawn += list(reference.values())
    _steps_axis(axis, [r["config"]["steps"] for r in records if r.get(key) is not None])
    return drawn


def _legend(figure, styles: dict[str, Style], names: Sequence[str], reference: bool = False) -> float:
    """One legend above the panels; returns the figure fraction it leaves for them."""
    handles = [
        plt.Line2D(
            [],
            [],
            color=styles[n].color,
            marker=styles[n].marker,
            ls=styles[n].linestyle,
            label=styles[n].label,
        )
        for n in names
    ]
    if reference:
        handles.append(
            plt.Line2D([], [], ls=":", marker="o", mfc="none", color="gray", label="hand-written loop")
        )
    columns = len(handles) if len(handles) <= 6 else math.ceil(len(handles) / 2)
    figure.legend(handles=handles, loc="upper center", ncol=columns, fontsize=8, frameon=False)
    rows = math.ceil(len(handles) / columns)
    return 1 - (0.05 + 0.045 * rows) * 3.4 / figure.get_figheight()


def _figure(columns: int, rows: int = 1, height: float = 3.4):
    return plt.subplots(rows, columns, figsize=(4.4 * columns, height * rows), squeeze=False)


def _save(figure, path: Path, top: float, bottom: float = 0.0) -> None:
    figure.tight_layout(rect=(0, bottom, 1, top))
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def _time_vs_steps(by_workload: dict[str, list[dict]], path: Path) -> None:
    every = [r for rs in by_workload.values() for r in rs]
    styles = strategy_styles(_strategies(every))
    figure, axes = _figure(len(by_workload))
    for axis, (workload, records) in zip(axes[0], by_workload.items(), strict=True):
        values = _plot_vs_steps(axis, records, "time_ms", styles, "reference_time_ms")
        _value_axis(axis, values, "ms per meta-step")
        axis.set_title(workload)
    has_reference = any(r.get("reference_time_ms") is not None for r in every)
    _save(figure, path, _legend(figure, styles, _strategies(every), reference=has_reference))


def _memory_vs_steps(
    by_workload: dict[str, list[dict]], path: Path, memory_key: str, memory_name: str
) -> bool:
    """Peak memory and saved bytes against S for the exact modes and FirstOrder (the table's core)."""
    core = {
        workload: [r for r in records if entry(r["config"]["strategy"]).core]
        for workload, records in by_workload.items()
    }
    core = {workload: records for workload, records in core.items() if records}
    if not core:
        return False
    every = [r for rs in core.values() for r in rs]
    styles = strategy_styles(_strategies(every))
    figure, axes = _figure(len(core), rows=2)
    for column, (workload, records) in enumerate(core.items()):
        top, bottom = axes[0][column], axes[1][column]
        _value_axis(top, _plot_vs_steps(top, records, memory_key, styles), f"peak {memory_name}, MiB")
        top.set_title(workload)
        _value_axis(bottom, _plot_vs_steps(bottom, records, "saved_mib", styles), "saved for backward, MiB")
    _save(figure, path, _legend(figure, styles, _strategies(every)))
    return True


def _ratio_axis(axis, ratios: Sequence[float]) -> None:
    """The time-ratio axis: log where the ratios span a factor of 3, always with 1 (SecondOrder) in view."""
    low, high = min([*ratios, 1.0]), max([*ratios, 1.0])
    if high / low > 3:
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlim(low / 1.3, high * 1.3)
    else:
        axis.set_xlim(0, 1.15 * high)
    axis.set_xlabel("time / SecondOrder's time (same S)")


def _cosine_axis(axis, cosines: Sequence[float]) -> None:
    axis.set_ylim(min([*cosines, 0.9]) - 0.05, 1.03)
    axis.set_ylabel("cosine to the exact meta-gradient")
    axis.grid(alpha=0.3)


def _step_sizes(steps: Iterable[int]) -> dict[int, float]:
    """Marker size per S (larger for more inner steps), instead of text labels that overlap."""
    return {s: 4.0 + 2.5 * rank for rank, s in enumerate(sorted(set(steps)))}


def _fidelity_vs_cost(by_workload: dict[str, list[dict]], path: Path) -> bool:
    panels = {}
    for workload, records in by_workload.items():
        exact_time = {
            r["config"]["steps"]: r["time_ms"] for r in records if r["config"]["strategy"] == EXACT_REFERENCE
        }
        usable = [r for r in records if r.get("cosine") is not None and r["config"]["steps"] in exact_time]
        if usable:
            panels[workload] = (usable, exact_time)
    if not panels:
        return False
    every = [r for usable, _ in panels.values() for r in usable]
    styles = strategy_styles(_strategies(every))
    sizes = _step_sizes(r["config"]["steps"] for r in every)
    figure, axes = _figure(len(panels))
    for axis, (workload, (usable, exact_time)) in zip(axes[0], panels.items(), strict=True):
        points = []
        for strategy in [s for s in styles if any(r["config"]["strategy"] == s for r in usable)]:
            mine = sorted(
                (r for r in usable if r["config"]["strategy"] == strategy), key=lambda r: r["config"]["steps"]
            )
            xs = [r["time_ms"] / exact_time[r["config"]["steps"]] for r in mine]
            ys = [r["cosine"] for r in mine]
            style = styles[strategy]
            axis.plot(xs, ys, color=style.color, ls=style.linestyle, lw=0.8)  # in order of S
            for x, y, record in zip(xs, ys, mine, strict=True):
                axis.plot(
                    x,
                    y,
                    color=style.color,
                    marker=style.marker,
                    ms=sizes[record["config"]["steps"]],
                    alpha=0.85,
                )
            points += list(zip(xs, ys, strict=True))
        _ratio_axis(axis, [x for x, _ in points])
        _cosine_axis(axis, [y for _, y in points])
        axis.axvline(1.0, color="gray", lw=0.6)
        axis.set_title(workload)
    figure.text(
        0.5,
        0.01,
        "marker size: inner steps S = "
        + ", ".join(map(str, sizes))
        + " (small to large)"
        + (
            ". Implicit: cosine to the exact gradient of its own proximal inner problem (solved to convergence)."
            if any(entry(r["config"]["strategy"]).proximal and r.get("fidelity_reference") for r in every)
            else ""
        ),
        ha="center",
        fontsize=8,
    )
    _save(figure, path, _legend(figure, styles, _strategies(every)), bottom=0.06)
    return True


def _size_sweep(records: Sequence[dict], path: Path) -> bool:
    sweep = [r for r in _ok(records) if r["config"]["workload"] in GROUPS["sweep"]]
    if len({r["config"]["workload"] for r in sweep}) < 2:
        return False
    styles = strategy_styles(_strategies(sweep))
    smallest_s = min(r["config"]["steps"] for r in sweep)
    figure, axes = _figure(2)
    for axis, key, label in (
        (axes[0][0], "time_ms", "ms per meta-step"),
        (axes[0][1], "saved_mib", "saved for backward, MiB"),
    ):
        lines: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for record in sweep:
            config = record["config"]
            if record.get(key) is not None:
                lines[(config["strategy"], config["steps"])].append(
                    (record["workload_info"]["params"] / 1e6, record[key])
                )
        values = []
        for (strategy, steps), points in sorted(lines.items()):
            if len(points) < 2:  # measured at one size only: not part of the sweep
                continue
            xs, ys = zip(*sorted(points), strict=True)
            style = styles[strategy]
            axis.plot(
                xs,
                ys,
                "-" if steps == smallest_s else "--",
                marker=style.marker,
                color=style.color,
                label=f"{style.label} S={steps}",
            )
            values += ys
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("parameters (millions; BERT hidden 128/256/512)")
        _value_axis(axis, values, label)
    axes[0][0].legend(fontsize=8)
    _save(figure, path, 1.0)
    return True


def write_plots(records: Sequence[dict], out_dir: Path, device: str) -> list[Path]:
    """Write the figures for ``records`` into ``out_dir``; return the paths written.

    Example:
        >>> write_plots(records, Path("metakit-bench"), "cpu")  # doctest: +SKIP
        [PosixPath('metakit-bench/time_vs_steps.png'), ...]
    """
    plt.switch_backend("Agg")  # files only, also on machines with a display
    by_workload = _by_workload(records)
    sizes = [name for name in GROUPS["sweep"] if name in by_workload]
    if len(sizes) >= 2 and len(by_workload) > len(sizes):  # the other sizes get their own figure
        by_workload = {k: v for k, v in by_workload.items() if k not in sizes or k == "bert"}
    if not by_workload:
        return []
    memory_key, memory_name = memory_column(device)
    paths = [out_dir / "time_vs_steps.png"]
    _time_vs_steps(by_workload, paths[0])
    if _memory_vs_steps(by_workload, out_dir / "memory_vs_steps.png", memory_key, memory_name):
        paths.append(out_dir / "memory_vs_steps.png")
    if _fidelity_vs_cost(by_workload, out_dir / "fidelity_vs_cost.png"):
        paths.append(out_dir / "fidelity_vs_cost.png")
    if _size_sweep(records, out_dir / "size_sweep.png"):
        paths.append(out_dir / "size_sweep.png")
    return paths
