"""The strategy contract: the problem a strategy is given, the gradient it returns, its interface."""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metakit.inner import Adaptation, InnerLoop, Objective, Regularizer, check_scalar_loss, model_objective
from metakit.precision import loss_scale_for, precision_objective, scaled_grad
from metakit.reuse import FEATURES, Cut
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

    Attributes:
        model: the module the parameter names refer to.
        loss_fn: ``loss_fn(forward, batch) -> scalar`` for this task.
        inner: the inner loop.
        task: the task (support and query batches).
        partition: the parameters, by role.
        index: the task's position in the meta-batch (error messages).
        lr_scales: MetaSGD scales by inner parameter name, or ``None``.
        trace_final: record the support loss after the last inner step (one more forward).
        cut: feature reuse (:class:`~metakit.reuse.Cut`): the model below the cut runs once per
            batch and the inner steps run only the top.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the forward passes under autocast, the loss,
            the inner updates and the meta-gradient in float32 (:mod:`metakit.precision`).
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

    @functools.cached_property
    def objective(self) -> Objective:
        """``objective(params, batch)``: the task's loss of the model run on ``params``.

        With a cut, ``params`` also holds the batch's features under :data:`~metakit.reuse.FEATURES`
        and only the top runs.
        """
        if self.cut is not None:
            return self._in_precision(self.cut.objective(self.model, self.loss_fn))
        return self._in_precision(model_objective(self.model, self.loss_fn, buffers=self.inner.buffers))

    def _in_precision(self, objective: Objective) -> Objective:
        if self.precision == "fp32":
            return objective
        device = next(iter(self.start.values())).device.type
        return precision_objective(objective, self.precision, device)

    @property
    def loss_scale(self) -> float | None:
        """The static loss scale of the gradients (float16 only)."""
        return loss_scale_for(self.precision)

    @functools.cached_property
    def query_objective(self) -> Objective:
        """The objective of the query forward: :attr:`objective`, except that ``"frozen"`` buffers
        apply to adaptation only (the query forward runs the module as it is)."""
        if self.cut is None and self.inner.buffers == "frozen":
            return self._in_precision(
                model_objective(self.model, self.loss_fn, buffers="frozen", adapting=False)
            )
        return self.objective

    def inner_inputs(self, differentiable: bool) -> tuple[Any, Params]:
        """The support batch and the context the inner steps run on.

        With a cut, the context also holds the support batch's features, computed once here: with
        their graph to the outer parameters below the cut when the inner steps are differentiated
        (``differentiable``), without one otherwise.
        """
        if self.cut is None:
            return self.task.support, self.context
        return self.task.support, {
            **self.context,
            FEATURES: self._features(self.task.support, differentiable),
        }

    def _features(self, batch: Any, graph: bool) -> torch.Tensor:
        assert self.cut is not None
        context = self.context if graph else {name: value.detach() for name, value in self.context.items()}
        start = self.start if graph else {name: value.detach() for name, value in self.start.items()}
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            return self.cut.features(
                self.model, {**context, **start}, self.loss_fn, batch, inner_names=frozenset(self.start)
            )

    def adapt(
        self,
        differentiable_steps: int = 0,
        *,
        start: Mapping[str, torch.Tensor] | None = None,
        context: Mapping[str, torch.Tensor] | None = None,
        regularizer: Regularizer | None = None,
    ) -> Adaptation:
        """Run the inner loop on the support batch from the learner's current values (or ``start``)."""
        batch, inputs = self.inner_inputs(differentiable=differentiable_steps > 0)
        return self.inner.adapt(
            self.start if start is None else start,
            batch,
            inputs if context is None else context,
            objective=self.objective,
            differentiable_steps=differentiable_steps,
            lr_scales=self.lr_scales,
            regularizer=regularizer,
            task_index=self.index,
            trace_final=self.trace_final,
            loss_scale=self.loss_scale,
        )

    def query_loss(self, adapted: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The query loss of the model with ``adapted`` inner parameters (differentiable)."""
        if self.cut is None:
            loss = self.query_objective({**self.context, **adapted}, self.task.query)
        else:
            features = self._features(self.task.query, graph=True)
            loss = self.objective({**self.context, **adapted, FEATURES: features}, self.task.query)
        check_scalar_loss(loss, f"query loss of task {self.index}")
        return loss


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
    """How one task's meta-gradient is computed: the interface every strategy implements."""

    #: Whether outer-only parameters (not adapted in the inner loop) are supported.
    supports_outer_only = True
    #: Whether MetaSGD learning-rate scales receive a gradient.
    supports_learned_lr = True

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


def detached(params: Mapping[str, torch.Tensor]) -> Params:
    """``params`` without autograd history."""
    return {name: value.detach() for name, value in params.items()}
