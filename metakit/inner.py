"""The inner loop: how one task adapts its parameters with a TorchOpt functional optimizer.

The surface is per step, so that a strategy can drive, wrap or recompute steps:

- :meth:`InnerLoop.init` makes the optimizer state for the inner parameters;
- :meth:`InnerLoop.step` is one update: the support loss, its gradient, the optimizer's update;
- :meth:`InnerLoop.adapt` is the whole loop, ``steps`` updates, with a trace of the support loss.

Every step evaluates an *objective*, ``objective(params, batch) -> scalar``, over one flat dict that
holds the inner parameters and the context (the other parameters the forward needs);
:func:`model_objective` makes one from a module and a ``loss_fn(forward, batch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchopt
from torchopt.base import GradientTransformation

from metakit.buffers import BufferPolicy, check_policy, eval_statistics, task_buffers
from metakit.functional import bind, double_backward_safe
from metakit.precision import scaled_grad
from metakit.spec import Spec
from metakit.task import LossFn

__all__ = [
    "Adaptation",
    "AdaptedParams",
    "InnerLoop",
    "InnerLossError",
    "Objective",
    "check_scalar_loss",
    "model_objective",
]

Params = dict[str, torch.Tensor]
#: ``objective(params, batch) -> scalar``: the loss of the model run on ``params`` (inner ∪ context).
Objective = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]
#: ``regularizer(inner_params) -> scalar``: a term added to the differentiated loss, not to the trace.
Regularizer = Callable[[Params], torch.Tensor]


class InnerLossError(FloatingPointError):
    """The support loss became NaN or infinite during the inner loop."""


def model_objective(
    model: torch.nn.Module, loss_fn: LossFn, *, buffers: BufferPolicy = "update", adapting: bool = True
) -> Objective:
    """``objective(params, batch) = loss_fn(bind(model, params), batch)``.

    Args:
        model: the module the parameter names refer to.
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        buffers: what the forwards do to the module's buffers (:mod:`metakit.buffers`): ``"update"``,
            ``"task"`` (one copy per objective, i.e. per task) or ``"frozen"``.
        adapting: the objective of the inner loop (``"frozen"`` applies to it only).

    Example:
        >>> objective = mk.inner.model_objective(model, mk.tasks.mse_loss)  # doctest: +SKIP
        >>> objective(dict(model.named_parameters()), task.support)  # doctest: +SKIP
    """
    check_policy(buffers)
    values = task_buffers(model, buffers)  # once per objective, not once per step
    frozen = buffers == "frozen" and adapting

    def objective(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        with eval_statistics(model, frozen):
            return loss_fn(bind(model, params, check_names=False, buffers=values), batch)

    return objective


@dataclass
class Adaptation:
    """What one run of :meth:`InnerLoop.adapt` produced.

    Attributes:
        params: the adapted inner parameters after the last step (carrying autograd history
            through the differentiated steps, if any).
        anchor: the leaf tensors where the differentiated segment starts (``params`` itself when no
            step is differentiated). The meta-gradient of a parameter in inner ∩ outer is the
            gradient with respect to its anchor: the steps before it count as identity.
        losses: support loss before each step and after the last, shape ``[steps + 1]``, detached.
        state: the optimizer state after the last step.
    """

    params: Params
    anchor: Params
    losses: torch.Tensor
    state: Any = None


#: Deprecated alias of :class:`Adaptation` (the name before the per-step inner loop).
AdaptedParams = Adaptation


class InnerLoop:
    """``steps`` updates of the parameters selected by ``params`` on a task's support batch.

    Args:
        params: the :class:`~metakit.Spec` of parameters that adapt per task.
        optimizer: a TorchOpt functional optimizer (``torchopt.sgd(lr=0.03)``, ``torchopt.adam(...)``),
            applied with ``inplace=False`` so each step is a new, differentiable tensor.
        steps: number of inner updates (≥ 1).
        learn_lr: MetaSGD: learn a per-element scale of every inner update, initialised to 1 (so
            the effective rate starts at the optimizer's), as outer parameters of the learner.
        buffers: what the inner loop's forwards do to BatchNorm statistics and other buffers:
            ``"update"`` them in place (default), keep a copy per ``"task"``, or use the running
            statistics, ``"frozen"`` (:mod:`metakit.buffers`).

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

    def gradient(
        self,
        params: Mapping[str, torch.Tensor],
        batch: Any,
        context: Mapping[str, torch.Tensor],
        *,
        objective: Objective,
        create_graph: bool = False,
        regularizer: Regularizer | None = None,
        where: str = "support loss",
        loss_scale: float | None = None,
    ) -> tuple[Params, torch.Tensor]:
        """The gradient of the support loss (plus ``regularizer``) at ``params``: ``(grads, loss)``.

        ``loss`` is the support loss without the regularizer, not detached. ``loss_scale`` (float16)
        computes it as ``grad(S · loss) / S``, the same function with no underflow inside the network.
        """
        params = dict(params)
        with double_backward_safe(create_graph):
            loss = objective({**context, **params}, batch)
        check_scalar_loss(loss, where)
        total = loss + regularizer(params) if regularizer is not None else loss
        grads = scaled_grad(total, tuple(params.values()), loss_scale, create_graph=create_graph)
        return dict(zip(params, grads, strict=True)), loss

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
        where: str = "support loss",
        loss_scale: float | None = None,
    ) -> tuple[Params, Any, torch.Tensor]:
        """One update of the inner parameters on ``batch``: ``(new params, new state, loss)``.

        Args:
            params: the inner parameters, by name; they must require grad.
            state: the optimizer state (from :meth:`init` or the previous step).
            batch: the support batch.
            context: the other parameters the forward needs.
            create_graph: keep the graph of the gradient, so the step can be differentiated
                (second order); otherwise the inner gradient is a constant.
            objective: ``objective({**context, **params}, batch) -> scalar``
                (:func:`model_objective`).
            lr_scales: MetaSGD scales, one tensor per inner parameter.
            regularizer: a term added to the differentiated loss (iMAML's proximal term), not to
                the returned loss.
            where: names the loss in error messages.
            loss_scale: float16 loss scaling of the gradient (:func:`metakit.precision.scaled_grad`).

        Returns:
            The updated parameters, the new state and the loss before the update (not detached).
        """
        grads, loss = self.gradient(
            params,
            batch,
            context,
            objective=objective,
            create_graph=create_graph,
            regularizer=regularizer,
            where=where,
            loss_scale=loss_scale,
        )
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

        The steps before the differentiated segment see fresh leaves and a detached context, so no
        graph is built through them.

        Args:
            params: initial values of the inner parameters (the learner's current values).
            batch: the support batch.
            context: the other parameters the forward needs, as live tensors.
            objective: ``objective(params, batch) -> scalar`` (:func:`model_objective`).
            differentiable_steps: how many of the last steps are differentiated (0: first order).
            lr_scales: MetaSGD scales, one tensor per inner parameter, or ``None``.
            regularizer: added to the differentiated loss, not to the trace.
            task_index: used in error messages.
            trace_final: also record the support loss after the last step (one more forward,
                without a graph); otherwise the trace's last entry is NaN.
            loss_scale: float16 loss scaling of the inner gradients.
        """
        steps = self.steps
        first_differentiable = steps - min(max(differentiable_steps, 0), steps)
        detached_context = {name: value.detach() for name, value in context.items()}
        losses: list[torch.Tensor] = []
        # Differentiated from the first step: the live tensors are the anchor (no copies needed).
        current = dict(params) if first_differentiable == 0 and _all_leaves(params) else fresh_leaves(params)
        state = self.init(current)
        anchor = current
        for step in range(steps):
            differentiable = step >= first_differentiable
            if step == first_differentiable:
                anchor = current
            current, state, loss = self.step(
                current,
                state,
                batch,
                context if differentiable else detached_context,
                create_graph=differentiable,
                objective=objective,
                lr_scales=lr_scales,
                regularizer=regularizer,
                where=f"support loss of task {task_index} at inner step {step}",
                loss_scale=loss_scale,
            )
            losses.append(loss.detach())
            if not differentiable:
                current = fresh_leaves(current)
        if first_differentiable == steps:
            anchor = current
        losses.append(
            self.final_loss(current, batch, detached_context, objective)
            if trace_final
            else torch.full_like(losses[0], float("nan"))
        )
        trace = torch.stack(losses)
        check_finite_trace(trace if trace_final else trace[:-1], task_index, has_final=trace_final)
        return Adaptation(params=current, anchor=anchor, losses=trace, state=state)

    @staticmethod
    def final_loss(
        params: Mapping[str, torch.Tensor],
        batch: Any,
        context: Mapping[str, torch.Tensor],
        objective: Objective,
    ) -> torch.Tensor:
        """The support loss at ``params``, without a graph (the trace's last entry)."""
        with torch.no_grad():
            detached = {name: value.detach() for name, value in params.items()}
            return objective({**context, **detached}, batch).detach()


def _all_leaves(params: Mapping[str, torch.Tensor]) -> bool:
    return all(value.requires_grad and value.grad_fn is None for value in params.values())


def fresh_leaves(params: Mapping[str, torch.Tensor]) -> Params:
    """Detached copies of ``params`` that require grad: the start of a new graph."""
    return {name: value.detach().requires_grad_(True) for name, value in params.items()}


def check_scalar_loss(loss: Any, what: str) -> None:
    """Raise a ``ValueError`` unless ``loss`` is a scalar floating-point tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"The {what} must be a scalar tensor; the loss function returned {type(loss).__name__}."
        )
    if loss.ndim != 0:
        raise ValueError(
            f"The {what} must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it "
            "(e.g. .mean()) inside the loss function."
        )
    if not loss.is_floating_point():
        raise ValueError(f"The {what} must be a floating-point scalar, got dtype {loss.dtype}.")


def check_finite_trace(trace: torch.Tensor, task_index: int, *, has_final: bool = True) -> None:
    """Raise :class:`InnerLossError` at the first non-finite support loss of ``trace``.

    ``trace`` holds the loss before each step, then (``has_final``) the loss after the last one.
    """
    bad = ~torch.isfinite(trace)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        last = has_final and step == len(trace) - 1
        where = f"after the last step ({step - 1})" if last else f"at inner step {step}"
        raise InnerLossError(
            f"The support loss of task {task_index} is {trace[step].item()} {where} "
            f"(losses so far: {trace[: step + 1].tolist()}). Lower the inner learning rate, clip the "
            "inner gradients (torchopt.chain(torchopt.clip_grad_norm(1.0), ...)) or check the task's data."
        )
