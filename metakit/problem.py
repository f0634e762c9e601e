"""The strategy contract: the problem a strategy is given, the gradient it returns, its interface."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metakit.buffers import TaskBuffers, eval_statistics
from metakit.capabilities import Capabilities
from metakit.inner import InnerLoop, model_forward
from metakit.precision import loss_scale_for, precision_objective, scaled_grad
from metakit.reuse import FEATURES, Cut
from metakit.step import InnerStep, Plain, Regularizer, Runner, detached, unroll
from metakit.task import LossFn, Task

__all__ = ["Partition", "Strategy", "TaskGradient", "TaskProblem", "detached", "gradients_by_name"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Partition:
    """The model's parameters in four disjoint groups, by name.

    Attributes:
        shared: inner ∩ outer: adapted per task and meta-learned (live tensors).
        inner_only: adapted per task, not meta-learned (Algorithm 1's task head; live tensors).
        outer_only: meta-learned, fixed in the inner loop (priming's backbone; live tensors).
        frozen: in neither set (detached).
    """

    shared: Params = field(default_factory=dict)
    inner_only: Params = field(default_factory=dict)
    outer_only: Params = field(default_factory=dict)
    frozen: Params = field(default_factory=dict)

    @property
    def inner(self) -> Params:
        """The parameters the inner loop adapts (shared, then inner-only)."""
        return {**self.shared, **self.inner_only}

    @property
    def context(self) -> Params:
        """The parameters the forward needs besides the inner ones."""
        return {**self.outer_only, **self.frozen}


@dataclass(kw_only=True)
class TaskProblem:
    """Everything a strategy needs to compute one task's meta-gradient.

    Built by keyword: ``TaskProblem(model=..., loss_fn=..., inner=..., task=..., partition=...)``.
    It makes the task's `InnerStep` (what an inner step means: objective,
    buffers, context, scales, loss scale) and runs the one inner loop; a strategy chooses only how
    many steps are differentiated and how a differentiated step runs.

    Attributes:
        model: the module the parameter names refer to.
        loss_fn: ``loss_fn(forward, batch) -> scalar`` for this task.
        inner: the inner loop.
        task: the task (support and query batches).
        partition: the parameters, by role.
        index: the task's position in the meta-batch (error messages).
        lr_scales: MetaSGD scales by inner parameter name, or ``None``.
        trace_final: record the support loss after the last inner step (one more forward).
        cut: feature reuse (`Cut`): the model below the cut runs once per
            batch and the inner steps run only the top.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the forward passes under autocast, the loss,
            the inner updates and the meta-gradient in float32 (`metakit.precision`).
        functional: the problem runs inside ``torch.func`` transforms (the ``Vmap`` executor):
            gradients are ``torch.func.grad``, buffers are throw-away per-task copies.
        batched_like: under ``vmap``, a zero of the task's batch (per-task copies of state and buffers).
        measure_before: also measure the query loss before the inner loop (`measured`).
    """

    model: nn.Module
    loss_fn: LossFn
    inner: InnerLoop
    task: Task
    partition: Partition
    index: int = 0
    lr_scales: Mapping[str, torch.Tensor] | None = None
    trace_final: bool = True
    cut: Cut | None = None
    precision: str = "fp32"
    functional: bool = False
    batched_like: torch.Tensor | None = None
    measure_before: bool = False

    @property
    def start(self) -> Params:
        """Initial values of the inner parameters (the learner's current values)."""
        return self.partition.inner

    @property
    def context(self) -> Params:
        """The non-inner parameters the forward needs."""
        return self.partition.context

    @property
    def shared(self) -> Params:
        """Parameters in inner ∩ outer."""
        return self.partition.shared

    @property
    def outer_only(self) -> Params:
        """Meta-learned parameters that the inner loop does not adapt."""
        return self.partition.outer_only

    @property
    def loss_scale(self) -> float | None:
        """The static loss scale of the gradients (float16 only)."""
        return loss_scale_for(self.precision)

    @functools.cached_property
    def buffers(self) -> TaskBuffers:
        """The task's buffers under the inner loop's policy (made once per task)."""
        return TaskBuffers(self.model, self.inner.buffers, self.batched_like)

    @functools.cached_property
    def forward(self):
        """``forward(params, batch, buffers) -> loss``: the model (its top under a cut) in the task's precision."""
        forward = (
            self.cut.forward(self.model, self.loss_fn)
            if self.cut is not None
            else model_forward(self.model, self.loss_fn)
        )
        if self.precision == "fp32":
            return forward
        device = next(iter(self.start.values())).device.type
        return precision_objective(forward, self.precision, device)

    def inner_step(
        self, *, differentiable: bool, batch: Any = None, regularizer: Regularizer | None = None
    ) -> tuple[InnerStep, Params]:
        """The task's inner step on its support batch (or ``batch``) and its live context.

        The live context is what the meta-gradient flows into besides the inner parameters: the
        outer-only parameters and, under a cut, the batch's features with their graph to the
        backbone (computed here, once; without a graph unless ``differentiable``). The frozen
        parameters are the step's constants.
        """
        batch = self.task.support if batch is None else batch
        live = dict(self.partition.outer_only)
        if self.cut is not None:
            live[FEATURES] = self._features(batch, differentiable, adapting=batch is self.task.support)
        step = InnerStep(
            self.inner,
            self.forward,
            self.model,
            self.buffers,
            batch,
            constants=detached(self.partition.frozen),
            loss_scale=self.loss_scale,
            regularizer=regularizer,
            task_index=self.index,
        )
        return step, live

    def _features(self, batch: Any, graph: bool, *, adapting: bool) -> torch.Tensor:
        assert self.cut is not None
        values = {**self.context, **self.start}
        if not graph:
            values = detached(values)
        buffers, running = self.buffers.for_forward(adapting=adapting, replay=self.functional)
        grad = torch.is_grad_enabled() and (graph or self.functional)
        with torch.set_grad_enabled(grad), eval_statistics(self.model, running):
            return self.cut.features(
                self.model,
                values,
                self.loss_fn,
                batch,
                inner_names=frozenset(self.start),
                buffers=buffers,
            )

    def adapt(
        self, differentiable_steps: int = 0, *, runner: Runner | None = None
    ) -> tuple[Params, torch.Tensor]:
        """Run the inner loop on the support batch from the learner's current values.

        Args:
            differentiable_steps: how many of the last steps keep a graph (0: first order).
            runner: how a differentiated step runs (default: plain, with ``create_graph``; under
                ``vmap`` always with ``torch.func.grad``).

        Returns:
            ``(adapted params, trace)``.
        """
        step, live = self.inner_step(differentiable=differentiable_steps > 0)
        if self.functional or runner is None:
            runner = Plain(create_graph=True, functional=self.functional)
        adapted, trace, _ = unroll(
            step,
            self.start,
            live,
            dict(self.lr_scales) if self.lr_scales else None,
            steps=self.inner.steps,
            differentiable_steps=differentiable_steps,
            runner=runner,
            functional=self.functional,
            trace_final=self.trace_final,
        )
        return adapted, trace

    def query_loss(self, adapted: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The query loss of the model with ``adapted`` inner parameters (differentiable)."""
        step, live = self.inner_step(differentiable=True, batch=self.task.query)
        return step.loss(
            adapted, live, adapting=False, replay=self.functional, where=f"query loss of task {self.index}"
        )

    def query_loss_before(self) -> torch.Tensor:
        """The query loss at the start values, before the inner loop: no graph, throw-away buffers, and
        no random numbers drawn from the caller's stream (so measuring it changes nothing else)."""
        devices = sorted({v.device.index or 0 for v in self.start.values() if v.device.type == "cuda"})
        with torch.no_grad(), _forked_rng(devices, enabled=not self.functional):
            step, live = self.inner_step(differentiable=False, batch=self.task.query)
            loss = step.loss(
                detached(self.start),
                detached(live),
                adapting=False,
                replay=True,
                where="query loss before adaptation",
            )
        return loss.detach()

    def measured(self, outcome: TaskGradient) -> TaskGradient:
        """``outcome`` with the measurements the learner asked for (``query_loss_before``) in its diagnostics."""
        if self.measure_before:
            outcome.diagnostics = {**outcome.diagnostics, "query_loss_before": self.query_loss_before()}
        return outcome

    def meta_gradient(self, meta_loss) -> TaskGradient:
        """The gradient of ``meta_loss(problem) -> (query loss, adapted, trace)`` with respect to the
        outer parameters and the MetaSGD scales: by ``autograd``, or by ``torch.func.grad`` when the
        problem is `functional` (the same function of the same values)."""
        targets = {**self.partition.shared, **self.partition.outer_only}
        scales = dict(self.lr_scales or {})
        if not self.functional:
            query_loss, adapted, trace = meta_loss(self)
            grads = gradients_by_name(
                query_loss, {**targets, **{f"lr:{k}": v for k, v in scales.items()}}, self.loss_scale
            )
            outer, lr = {n: grads[n] for n in targets}, {n: grads[f"lr:{n}"] for n in scales}
        else:
            scale = self.loss_scale

            def scaled(targets: Params, scales: Params):
                problem = self.with_values(targets, scales)
                query_loss, adapted, trace = meta_loss(problem)
                total = query_loss * scale if scale is not None else query_loss
                return total, (query_loss, detached(adapted), trace)

            (outer, lr), (query_loss, adapted, trace) = torch.func.grad(scaled, argnums=(0, 1), has_aux=True)(
                targets, scales
            )
            if scale is not None:
                outer = {n: g / scale for n, g in outer.items()}
                lr = {n: g / scale for n, g in lr.items()}
        return TaskGradient(query_loss.detach(), trace, outer, lr, detached(adapted))

    def with_values(
        self, targets: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor]
    ) -> TaskProblem:
        """This problem with other values of the outer parameters and MetaSGD scales."""
        partition = Partition(
            shared={n: targets[n] for n in self.partition.shared},
            inner_only=self.partition.inner_only,
            outer_only={n: targets[n] for n in self.partition.outer_only},
            frozen=self.partition.frozen,
        )
        return dataclasses.replace(self, partition=partition, lr_scales=dict(scales) or None)


def _forked_rng(devices: list[int], *, enabled: bool):
    return torch.random.fork_rng(devices=devices) if enabled else contextlib.nullcontext()


@dataclass
class TaskGradient:
    """One task's contribution: meta-gradients by outer name (and by MetaSGD scale name).

    Attributes:
        query_loss: the task's post-adaptation query loss (detached).
        inner_losses: the support-loss trace, ``[steps + 1]``.
        grads: meta-gradient by outer parameter name.
        lr_grads: meta-gradient by inner parameter name of its MetaSGD scale.
        adapted: the adapted inner parameters (detached).
        diagnostics: per-task measurements a strategy reports (e.g. Implicit's residuals), by name.
    """

    query_loss: torch.Tensor
    inner_losses: torch.Tensor
    grads: Params
    lr_grads: Params
    adapted: Params
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Strategy(abc.ABC):
    """How one task's meta-gradient is computed: the interface every strategy implements.

    A strategy declares what it needs and supports in `capabilities`
    (`Capabilities`). A custom strategy is assumed to need double
    backward and to have no ``torch.func`` form unless it says otherwise.
    """

    capabilities = Capabilities(double_backward=True, functional=False, loss_scaling=False)

    @abc.abstractmethod
    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        """Adapt to ``problem.task`` and return its meta-gradient by outer parameter name."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def gradients_by_name(
    loss: torch.Tensor, wrt: Mapping[str, torch.Tensor], loss_scale: float | None = None
) -> Params:
    """Gradients of ``loss`` by name; a tensor the loss does not depend on gets zeros."""
    names = [name for name, value in wrt.items() if value.requires_grad]
    grads = scaled_grad(loss, [wrt[name] for name in names], loss_scale, allow_unused=True) if names else ()
    by_name = dict(zip(names, grads, strict=True))
    return {
        name: (by_name.get(name) if by_name.get(name) is not None else torch.zeros_like(value))
        for name, value in wrt.items()
    }
