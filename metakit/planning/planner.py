"""``mk.plan``: predicted peak memory and time of one meta-step per gradient mode, before running it.

Each mode's meta-step is traced once on fake tensors (`metakit.planning.fake`) while a
`CostTracker` counts live bytes, FLOPs and memory traffic: the same
Python code, the same autograd graph and the same frees as a real step, with no data. The bytes
are the tensors' own (what ``torch.cuda.max_memory_allocated`` would count, before the allocator's
rounding); the seconds are a roofline estimate on the device's datasheet rates (`Device`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from metakit.learner import MetaLearner
from metakit.planning.devices import GIB, Device, get_device
from metakit.planning.fake import fake_mode_of, fake_step
from metakit.planning.trace import CostTracker, OpCost, UntraceableError
from metakit.strategies import FirstOrder, SecondOrder, Strategy
from metakit.task import Task

__all__ = ["Mode", "Plan", "PlanRow", "default_modes", "plan"]


@dataclass(frozen=True)
class Mode:
    """A gradient mode to plan: its table label, how to build it, and whether its gradient is exact."""

    label: str
    build: Callable[[], Strategy]
    exact: bool


def default_modes(steps: int, checkpoint: int | None = None) -> list[Mode]:
    """The exact modes and FirstOrder; recomputed segments of ``checkpoint`` steps (default ⌈√S⌉)."""
    k = checkpoint if checkpoint is not None else max(1, math.ceil(math.sqrt(steps)))
    return [
        Mode("SecondOrder()", SecondOrder, True),
        Mode('SecondOrder(hvp="forward")', lambda: SecondOrder(hvp="forward"), True),
        Mode(f"SecondOrder(checkpoint={k})", lambda: SecondOrder(checkpoint=k), True),
        Mode(
            f'SecondOrder(hvp="forward", checkpoint={k})',
            lambda: SecondOrder(hvp="forward", checkpoint=k),
            True,
        ),
        Mode("FirstOrder()", FirstOrder, False),
    ]


@dataclass(frozen=True)
class Estimate:
    """What tracing one mode gave, independent of the device (``step_bytes`` None: not planned)."""

    mode: Mode
    step_bytes: int | None = None
    flops: int | None = None
    ops: Counter[OpCost] | None = None
    note: str = ""


@dataclass(frozen=True)
class PlanRow:
    """One mode on one device.

    Attributes:
        mode: the strategy, as code (``SecondOrder(checkpoint=3)``).
        exact: computes MAML's exact meta-gradient.
        step_bytes: peak bytes the meta-step allocates on top of what exists before it.
        total_bytes: ``step_bytes`` plus the model, the batch and the outer optimizer's state.
        flops: FLOPs of the step (matmuls, convolutions, attention).
        seconds: predicted time of the step on the device.
        fits: ``total_bytes`` fits the device's usable memory (``None``: not planned).
        note: why a mode was not planned, or the recommendation.
    """

    mode: str
    exact: bool
    step_bytes: int | None
    total_bytes: int | None
    flops: int | None
    seconds: float | None
    fits: bool | None
    note: str = ""

    @property
    def planned(self) -> bool:
        return self.step_bytes is not None


@dataclass
class Plan:
    """The predicted cost of one meta-step in each mode on a device, and the mode to use.

    Attributes:
        device: the `Device` planned for.
        steps: inner steps S.
        resident_bytes: parameters, buffers and the meta-batch, which exist before the step.
        optimizer_bytes: the outer optimizer's state (Adam: two tensors per outer parameter).
        rows: one `PlanRow` per mode.
        recommended: the fastest exact mode that fits; FirstOrder if no exact one does; ``None`` if
            nothing fits.
    """

    device: Device
    steps: int
    resident_bytes: int
    optimizer_bytes: int
    estimates: list[Estimate] = field(repr=False)
    rows: list[PlanRow] = field(init=False)
    recommended: PlanRow | None = field(init=False)

    def __post_init__(self) -> None:
        self.rows = [self._row(e) for e in self.estimates]
        fitting = [r for r in self.rows if r.fits]
        exact = [r for r in fitting if r.exact]
        choice = min(exact or fitting, key=lambda r: r.seconds or 0.0, default=None)
        if choice is not None:
            index = self.rows.index(choice)
            self.rows[index] = choice = replace(choice, note=choice.note or "recommended")
        self.recommended = choice  # the row in ``rows``, so that ``row is plan.recommended`` holds

    def on(self, device: str | Device) -> Plan:
        """The same traces, evaluated for another device (no new tracing)."""
        return Plan(get_device(device), self.steps, self.resident_bytes, self.optimizer_bytes, self.estimates)

    def row(self, mode: str) -> PlanRow:
        """The row whose mode is ``mode`` (its label, e.g. ``"SecondOrder()"``; either quotes)."""
        for row in self.rows:
            if _unquoted(row.mode) == _unquoted(mode):
                return row
        raise KeyError(f"no mode {mode!r} in this plan; it has {[r.mode for r in self.rows]}")

    @property
    def advice(self) -> str:
        """One line: which mode to use on this device, and why."""
        usable = _size(self.device.usable_bytes)
        choice = self.recommended
        if choice is None:
            planned = [r for r in self.rows if r.planned]
            if not planned:
                return "no mode could be planned (see the notes)"
            least = min(planned, key=lambda r: r.total_bytes or 0)
            return f"nothing fits {self.device.name} ({usable} usable): the least, {least.mode}, needs {_size(least.total_bytes)}"
        if choice.exact:
            return (
                f"{choice.mode}: the fastest exact mode that fits {self.device.name} "
                f"({_size(choice.total_bytes)} of {usable} usable, {_seconds(choice.seconds)} per meta-step)"
            )
        return (
            f"no exact mode fits {self.device.name} ({usable} usable); {choice.mode} fits "
            f"({_size(choice.total_bytes)}), with a first-order approximation of the meta-gradient"
        )

    def to_markdown(self) -> str:
        """The plan as a Markdown table, with the device and the advice."""
        lines = [
            f"Plan for {self.device.name}, S = {self.steps}: model and batch {_size(self.resident_bytes)}, "
            f"outer optimizer state {_size(self.optimizer_bytes)}, usable memory {_size(self.device.usable_bytes)}",
            "",
            "| mode | step peak | total | fits | time | GFLOP | note |",
            "|---|---:|---:|:---:|---:|---:|---|",
        ]
        for r in self.rows:
            fits = "" if r.fits is None else ("yes" if r.fits else "no")
            gflop = "" if r.flops is None else f"{r.flops / 1e9:,.0f}"
            lines.append(
                f"| {r.mode} | {_size(r.step_bytes)} | {_size(r.total_bytes)} | {fits} | {_seconds(r.seconds)} "
                f"| {gflop} | {r.note} |"
            )
        lines += ["", f"Recommended: {self.advice}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _row(self, estimate: Estimate) -> PlanRow:
        mode = estimate.mode
        if estimate.step_bytes is None or estimate.ops is None:
            return PlanRow(mode.label, mode.exact, None, None, None, None, None, estimate.note)
        total = self.resident_bytes + self.optimizer_bytes + estimate.step_bytes
        seconds = sum(
            n * self.device.seconds(op.flops, op.bytes, op.low_precision) for op, n in estimate.ops.items()
        )
        return PlanRow(
            mode.label,
            mode.exact,
            estimate.step_bytes,
            total,
            estimate.flops,
            seconds,
            self.device.fits(total),
            estimate.note,
        )


def plan(
    model: nn.Module,
    learner: MetaLearner,
    batch: Task | Sequence[Task] | object,
    device: str | Device = "a100-80gb",
    *,
    modes: Sequence[Mode | Strategy] | None = None,
    checkpoint: int | None = None,
    optimizer_state: int = 2,
) -> Plan:
    """Predict the peak memory and time of one meta-step in each exact mode and FirstOrder.

    Nothing runs for real: each mode's meta-step is traced on fake tensors (shapes, no data), so a
    model too large for this machine can be planned (build it under ``FakeTensorMode``). The model's
    weights, its gradients and the random state are not touched.

    Args:
        model: the learner's model (real, or built under ``FakeTensorMode``).
        learner: the `MetaLearner`; its inner loop, outer spec, executor, cut and precision are
            kept, its strategy replaced by each mode's.
        batch: the meta-batch: a `Task`, a list of them, or one batch (used as support and query).
        device: a known name (``"a100-80gb"``, ``"t4"``, ``"cpu"``...) or a `Device`.
        modes: what to plan (default `default_modes`): `Mode`s or strategies such as
            ``mk.SecondOrder(checkpoint=2)``; a mode that cannot be built or traced is listed as
            "not planned" with the reason, and the others are planned.
        checkpoint: segment length of the recomputed modes (default ⌈√S⌉).
        optimizer_state: tensors of outer-optimizer state per outer parameter (Adam 2, SGD with
            momentum 1, SGD 0), counted in the total.

    Returns:
        A `Plan`; ``print(plan)`` shows the table and the recommended mode.

    Example:
        >>> p = mk.plan(model, learner, tasks, device="a100-80gb")  # doctest: +SKIP
        >>> print(p); p.recommended.mode  # doctest: +SKIP
    """
    device = get_device(device)
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"plan() expects a metakit.MetaLearner, got {type(learner).__name__}.")
    tasks = _as_tasks(batch)
    steps = learner.inner.steps
    modes = [_as_mode(m) for m in modes] if modes is not None else default_modes(steps, checkpoint)
    if not any(_same(m.label, learner.strategy) for m in modes):
        own = learner.strategy
        modes.append(Mode(f"{own!r} (the learner's)", lambda: own, isinstance(own, SecondOrder)))
    estimates = [_estimate(mode, model, learner, tasks) for mode in modes]
    outer = learner.outer_parameters()
    batch_tensors = [t for task in tasks for t in _leaves((task.support, task.query))]
    resident = _nbytes([*model.parameters(), *model.buffers(), *learner.lr_scales.values(), *batch_tensors])
    return Plan(device, steps, resident, optimizer_state * _nbytes(outer), estimates)


def _estimate(mode: Mode, model: nn.Module, learner: MetaLearner, tasks: list[Task]) -> Estimate:
    try:
        strategy = mode.build()
    except Exception as error:  # e.g. a combination this metakit does not have yet
        return Estimate(mode, note=f"not planned: {_line(error)}")
    try:
        return _trace(mode, strategy, model, learner, tasks)
    except UntraceableError as error:
        return Estimate(mode, note=f"not planned: {error}")
    except Exception as error:  # a refused composition, a missing forward-mode rule, ...
        return Estimate(mode, note=f"not planned: {_line(error)}")


def _trace(
    mode: Mode, strategy: Strategy, model: nn.Module, learner: MetaLearner, tasks: list[Task]
) -> Estimate:
    fake_mode = fake_mode_of(model)
    with torch.random.fork_rng(devices=[]):
        step = fake_step(model, tasks, fake_mode)
        with fake_mode:
            traced = MetaLearner(
                step.model,
                learner.loss_fn,
                inner=learner.inner,
                outer_params=learner.outer_spec,
                strategy=strategy,
                inner_only=learner.inner_only,
                executor=learner.executor,
                cut=learner.cut,
                precision=learner.precision,
            )
        traced._grad_norms = _no_norms  # they read every gradient's value, which a fake tensor has not
        tracker = CostTracker()
        tracker.exclude([*step.resident(), *traced.lr_scales.values()])
        for fake, real in step.batch_values:
            tracker.shadow(fake, real)
        with fake_mode, tracker:
            traced.meta_step(step.tasks)
    return Estimate(mode, tracker.peak, tracker.flops, tracker.ops)


def _no_norms(grads, lr_grads) -> dict[str, float]:
    return {}


def _as_tasks(batch) -> list[Task]:
    if isinstance(batch, Task):
        return [batch]
    if isinstance(batch, list | tuple) and batch and all(isinstance(t, Task) for t in batch):
        return list(batch)
    return [Task(batch, batch)]


def _as_mode(mode: Mode | Strategy) -> Mode:
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, Strategy):
        return Mode(repr(mode), lambda: mode, isinstance(mode, SecondOrder))
    raise TypeError(
        f"plan(modes=...) takes metakit strategies (mk.SecondOrder(checkpoint=2), ...) or "
        f"metakit.planning.Mode, got {type(mode).__name__}."
    )


def _same(label: str, strategy: Strategy) -> bool:
    return _unquoted(label) == _unquoted(repr(strategy))


def _unquoted(text: str) -> str:
    return text.replace("'", '"')


def _leaves(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _leaves(v)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage
    return sum(s.nbytes() for s in storages.values())


def _line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return ""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.3g} s" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"
