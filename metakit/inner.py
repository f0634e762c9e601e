"""The inner loop: how one task adapts its parameters with a TorchOpt functional optimizer.

The surface is per step, so that a strategy can drive, wrap or recompute steps:

- `InnerLoop.init` makes the optimizer state for the inner parameters;
- `InnerLoop.step` is one update: the support loss, its gradient, the optimizer's update;
- `InnerLoop.adapt` is the whole loop, ``steps`` updates, with a trace of the support loss.

Every step evaluates an *objective*, ``objective(params, batch) -> scalar``, over one flat dict that
holds the inner parameters and the context (the other parameters the forward needs);
`model_objective` makes one from a module and a ``loss_fn(forward, batch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchopt
from torchopt.base import GradientTransformation

from metakit.buffers import BufferPolicy, TaskBuffers, check_policy
from metakit.functional import bind
from metakit.spec import Spec
from metakit.step import (
    InnerLossError,
    InnerStep,
    Plain,
    Regularizer,
    check_finite_trace,
    check_scalar_loss,
    fresh_leaves,
    unroll,
)
from metakit.task import LossFn

__all__ = [
    "Adaptation",
    "AdaptedParams",
    "InnerLoop",
    "InnerLossError",
    "Objective",
    "check_finite_trace",
    "check_scalar_loss",
    "fresh_leaves",
    "model_forward",
    "model_objective",
]

Params = dict[str, torch.Tensor]
#: ``objective(params, batch) -> scalar``: the loss of the model run on ``params`` (inner ∪ context).
Objective = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]


def model_objective(
    model: torch.nn.Module, loss_fn: LossFn, *, buffers: BufferPolicy = "update", adapting: bool = True
) -> Objective:
    """``objective(params, batch) = loss_fn(bind(model, params), batch)``.

    Args:
        model: the module the parameter names refer to.
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        buffers: what the forwards do to the module's buffers (`metakit.buffers`): ``"update"``,
            ``"task"`` (one copy per objective, i.e. per task) or ``"frozen"``.
        adapting: the objective of the inner loop (``"frozen"`` applies to it only).

    Example:
        >>> objective = mk.inner.model_objective(model, mk.tasks.mse_loss)  # doctest: +SKIP
        >>> objective(dict(model.named_parameters()), task.support)  # doctest: +SKIP
    """
    check_policy(buffers)
    task = TaskBuffers(model, buffers)  # once per objective, not once per step

    def objective(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        step = InnerStep(None, model_forward(model, loss_fn), model, task, batch)
        return step.loss(params, {}, adapting=adapting)

    return objective


def model_forward(model: torch.nn.Module, loss_fn: LossFn):
    """``forward(params, batch, buffers) = loss_fn(bind(model, params, buffers=buffers), batch)``."""

    def forward(params: Mapping[str, torch.Tensor], batch: Any, buffers: Mapping[str, torch.Tensor]):
        return loss_fn(bind(model, params, check_names=False, buffers=buffers), batch)

    return forward


@dataclass
class Adaptation:
    """What one run of the inner loop produced.

    Attributes:
        params: the adapted inner parameters after the last step. Through the differentiated steps
            they carry autograd history to the start values; the steps before count as identity
            (``φ.detach() + (start - start.detach())``), so the meta-gradient of a parameter in inner ∩ outer is
            taken with respect to its start value itself.
        losses: support loss before each step and after the last, shape ``[steps + 1]``, detached.
        state: the optimizer state after the last step.
    """

    params: Params
    losses: torch.Tensor
    state: Any = None


#: Deprecated alias of `Adaptation` (the name before the per-step inner loop).
AdaptedParams = Adaptation


class InnerLoop:
    """``steps`` updates of the parameters selected by ``params`` on a task's support batch.

    Args:
        params: the `Spec` of parameters that adapt per task.
        optimizer: a TorchOpt functional optimizer (``torchopt.sgd(lr=0.03)``, ``torchopt.adam(...)``),
            applied with ``inplace=False`` so each step is a new, differentiable tensor.
        steps: number of inner updates (≥ 1).
        learn_lr: MetaSGD: learn a per-element scale of every inner update, initialised to 1 (so
            the effective rate starts at the optimizer's), as outer parameters of the learner.
        buffers: what the inner loop's forwards do to BatchNorm statistics and other buffers:
            ``"update"`` them in place (default), keep a copy per ``"task"``, or use the running
            statistics, ``"frozen"`` (`metakit.buffers`).

    Example:
        >>> inner = mk.InnerLoop(params=mk.select("head.*"), optimizer=torchopt.sgd(lr=0.03), steps=5)
    """

    def __init__(
        self,
        params: Spec,
        optimizer: GradientTransformation,
        steps: int,
        learn_lr: bool = False,
        buffers: BufferPolicy = "update",
    ):
        if not isinstance(params, Spec):
            raise TypeError(
                f"InnerLoop(params=...) expects a metakit Spec such as mk.select('head.*'), got "
                f"{type(params).__name__} {params!r}."
            )
        if not isinstance(optimizer, GradientTransformation):
            raise TypeError(
                "InnerLoop(optimizer=...) expects a TorchOpt functional optimizer (a "
                f"torchopt.base.GradientTransformation such as torchopt.sgd(lr=0.03)), got "
                f"{type(optimizer).__name__} {optimizer!r}. torch.optim optimizers mutate tensors in place "
                "and cannot be differentiated through; use them for the outer loop."
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"InnerLoop(steps=...) must be an int >= 1, got {steps!r}.")
        check_policy(buffers)
        self.params = params
        self.optimizer = optimizer
        self.steps = steps
        self.learn_lr = learn_lr
        self.buffers = buffers

    def __repr__(self) -> str:
        extra = ", learn_lr=True" if self.learn_lr else ""
        extra += f", buffers={self.buffers!r}" if self.buffers != "update" else ""
        return f"InnerLoop(params={self.params!r}, steps={self.steps}{extra})"

    # -- one step ---------------------------------------------------------------------------------
    def init(self, params: Mapping[str, torch.Tensor]) -> Any:
        """The optimizer state for ``params`` (the inner parameters, by name)."""
        return self.optimizer.init(dict(params))

    def update(
        self,
        grads: Mapping[str, torch.Tensor],
        state: Any,
        params: Mapping[str, torch.Tensor],
        lr_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Params, Any]:
        """Apply the optimizer to ``grads``: ``(new params, new state)``, differentiable, no mutation."""
        params = dict(params)
        updates, state = self.optimizer.update(dict(grads), state, params=params, inplace=False)
        if lr_scales is not None:
            updates = {name: update * lr_scales[name] for name, update in updates.items()}
        return torchopt.apply_updates(params, updates, inplace=False), state

    def as_step(
        self,
        batch: Any,
        context: Mapping[str, torch.Tensor],
        objective: Objective,
        *,
        regularizer: Regularizer | None = None,
        loss_scale: float | None = None,
        task_index: int = 0,
    ) -> InnerStep:
        """This loop's step on ``batch`` for an objective over one dict (``context`` its constants)."""
        return InnerStep(
            self,
            lambda params, batch, _buffers: objective(params, batch),
            None,
            TaskBuffers(None),
            batch,
            constants=dict(context),
            loss_scale=loss_scale,
            regularizer=regularizer,
            task_index=task_index,
        )

    def gradient(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Any,
        context: Mapping[str, torch.Tensor],
        *,
        objective: Objective,
        create_graph: bool = False,
        regularizer: Regularizer | None = None,
        loss_scale: float | None = None,
    ) -> tuple[Params, torch.Tensor]:
        """The gradient of the support loss (plus ``regularizer``) at ``params``: ``(grads, loss)``.

        ``loss`` is the support loss without the regularizer, not detached. ``loss_scale`` (float16)
        computes it as ``grad(S · loss) / S``, the same function with no underflow inside the network.
        """
        step = self.as_step(batch, context, objective, regularizer=regularizer, loss_scale=loss_scale)
        return step.gradient(0, params, {}, create_graph=create_graph)

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        state: Any,
        batch: Any,
        context: Mapping[str, torch.Tensor],
        *,
        create_graph: bool,
        objective: Objective,
        lr_scales: Mapping[str, torch.Tensor] | None = None,
        regularizer: Regularizer | None = None,
        loss_scale: float | None = None,
    ) -> tuple[Params, Any, torch.Tensor]:
        """One update of the inner parameters on ``batch``: ``(new params, new state, loss)``.

        Args:
            params: the inner parameters, by name; they must require grad.
            state: the optimizer state (from `init` or the previous step).
            batch: the support batch.
            context: the other parameters the forward needs.
            create_graph: keep the graph of the gradient, so the step can be differentiated
                (second order); otherwise the inner gradient is a constant.
            objective: ``objective({**context, **params}, batch) -> scalar`` (`model_objective`).
            lr_scales: MetaSGD scales, one tensor per inner parameter.
            regularizer: a term added to the differentiated loss (iMAML's proximal term), not to
                the returned loss.
            loss_scale: float16 loss scaling of the gradient (`metakit.precision.scaled_grad`).

        Returns:
            The updated parameters, the new state and the loss before the update (not detached).
        """
        step = self.as_step(batch, context, objective, regularizer=regularizer, loss_scale=loss_scale)
        grads, loss = step.gradient(0, params, {}, create_graph=create_graph)
        new_params, state = self.update(grads, state, params, lr_scales)
        return new_params, state, loss

    # -- the whole loop ---------------------------------------------------------------------------
    def adapt(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Any,
        context: Mapping[str, torch.Tensor],
        *,
        objective: Objective,
        differentiable_steps: int = 0,
        lr_scales: Mapping[str, torch.Tensor] | None = None,
        regularizer: Regularizer | None = None,
        task_index: int = 0,
        trace_final: bool = True,
        loss_scale: float | None = None,
    ) -> Adaptation:
        """Adapt ``params`` on ``batch`` for ``steps`` steps; the last ``differentiable_steps`` keep their graph.

        The steps before the differentiated segment see a detached context and count as identity
        for ``params`` (`metakit.step.unroll`, the loop every strategy runs).

        Args:
            params: initial values of the inner parameters (the learner's current values).
            batch: the support batch.
            context: the other parameters the forward needs; those that require grad are live (the
                meta-gradient flows into them through the differentiated steps).
            objective: ``objective(params, batch) -> scalar`` (`model_objective`).
            differentiable_steps: how many of the last steps are differentiated (0: first order).
            lr_scales: MetaSGD scales, one tensor per inner parameter, or ``None``.
            regularizer: added to the differentiated loss, not to the trace.
            task_index: used in error messages.
            trace_final: also record the support loss after the last step (one more forward,
                without a graph); otherwise the trace's last entry is NaN.
            loss_scale: float16 loss scaling of the inner gradients.
        """
        live = {name: value for name, value in context.items() if value.requires_grad}
        constants = {name: value.detach() for name, value in context.items() if name not in live}
        step = self.as_step(
            batch, constants, objective, regularizer=regularizer, loss_scale=loss_scale, task_index=task_index
        )
        adapted, trace, state = unroll(
            step,
            dict(params),
            live,
            dict(lr_scales) if lr_scales else None,
            steps=self.steps,
            differentiable_steps=differentiable_steps,
            runner=Plain(create_graph=True),
            trace_final=trace_final,
        )
        return Adaptation(params=adapted, losses=trace, state=state)
