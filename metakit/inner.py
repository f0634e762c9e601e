"""The inner loop: how one task adapts its parameters with a TorchOpt functional optimizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchopt
from torchopt.base import GradientTransformation

from metakit.functional import bind, double_backward_safe
from metakit.spec import Spec
from metakit.task import LossFn

__all__ = ["AdaptedParams", "InnerLoop", "InnerLossError", "check_scalar_loss"]

Params = dict[str, torch.Tensor]


class InnerLossError(FloatingPointError):
    """The support loss became NaN or infinite during the inner loop."""


@dataclass
class AdaptedParams:
    """What one run of the inner loop produced.

    Attributes:
        params: the adapted inner parameters after the last step (carrying autograd history
            through the differentiable steps, if any).
        anchor: the leaf tensors where the differentiable segment starts (``params`` itself when no
            step is differentiated). The meta-gradient of a parameter in inner ∩ outer is the
            gradient with respect to its anchor: the steps before it are treated as identity.
        losses: support loss before each step and after the last, shape ``[steps + 1]``, detached.
    """

    params: Params
    anchor: Params
    losses: torch.Tensor


class InnerLoop:
    """``steps`` updates of the parameters selected by ``params`` on a task's support batch.

    Args:
        params: the :class:`~metakit.Spec` of parameters that adapt per task.
        optimizer: a TorchOpt functional optimizer (``torchopt.sgd(lr=0.03)``, ``torchopt.adam(...)``),
            applied with ``inplace=False`` so each step is a new, differentiable tensor.
        steps: number of inner updates (≥ 1).
        learn_lr: MetaSGD: learn a per-element scale of every inner update, initialised to 1 (so
            the effective rate starts at the optimizer's), as outer parameters of the learner.

    Example:
        >>> inner = mk.InnerLoop(params=mk.select("head.*"), optimizer=torchopt.sgd(lr=0.03), steps=5)
    """

    def __init__(self, params: Spec, optimizer: GradientTransformation, steps: int, learn_lr: bool = False):
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
        self.params = params
        self.optimizer = optimizer
        self.steps = steps
        self.learn_lr = learn_lr

    def __repr__(self) -> str:
        extra = ", learn_lr=True" if self.learn_lr else ""
        return f"InnerLoop(params={self.params!r}, steps={self.steps}{extra})"

    def run(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batch: Any,
        start: Mapping[str, torch.Tensor],
        context: Mapping[str, torch.Tensor],
        *,
        differentiable_steps: int,
        lr_scales: Mapping[str, torch.Tensor] | None = None,
        task_index: int = 0,
        regularizer: Callable[[Params], torch.Tensor] | None = None,
    ) -> AdaptedParams:
        """Adapt ``start`` on ``batch``; the last ``differentiable_steps`` steps keep their graph.

        Args:
            model: the module the parameter names refer to.
            loss_fn: ``loss_fn(forward, batch) -> scalar``.
            batch: the support batch.
            start: initial values of the inner parameters (the learner's current values).
            context: the other parameters the forward needs, as live tensors; the steps that are
                not differentiated see them detached, so no graph is built through them.
            differentiable_steps: how many of the last steps are differentiated (0: first order).
            lr_scales: MetaSGD scales, one tensor per inner parameter, or ``None``.
            task_index: used in error messages.
            regularizer: a term added to the loss that is differentiated (e.g. iMAML's proximal
                term), but not to the recorded losses.
        """
        steps = self.steps
        first_differentiable = steps - min(differentiable_steps, steps)
        detached_context = {name: value.detach() for name, value in context.items()}
        losses: list[torch.Tensor] = []
        # Between non-differentiated steps the params are fresh leaves, so whichever step starts the
        # differentiated segment finds its anchor there.
        params = _fresh_leaves(start)
        state = self.optimizer.init(params)
        anchor = params
        for step in range(steps):
            differentiable = step >= first_differentiable
            if step == first_differentiable:
                anchor = params
            forward = bind(
                model, {**(context if differentiable else detached_context), **params}, check_names=False
            )
            with double_backward_safe(differentiable):
                loss = loss_fn(forward, batch)
            check_scalar_loss(loss, f"support loss of task {task_index} at inner step {step}")
            losses.append(loss.detach())
            if regularizer is not None:
                loss = loss + regularizer(params)
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=differentiable)
            grads_by_name = dict(zip(params, grads, strict=True))
            updates, state = self.optimizer.update(grads_by_name, state, params=params, inplace=False)
            if lr_scales is not None:
                updates = {name: update * lr_scales[name] for name, update in updates.items()}
            params = torchopt.apply_updates(params, updates, inplace=False)
            if not differentiable:
                params = _fresh_leaves(params)
        if first_differentiable == steps:
            anchor = params
        with torch.no_grad():
            losses.append(
                loss_fn(bind(model, {**detached_context, **params}, check_names=False), batch).detach()
            )
        trace = torch.stack(losses)
        _check_finite(trace, task_index)
        return AdaptedParams(params=params, anchor=anchor, losses=trace)


def _fresh_leaves(params: Mapping[str, torch.Tensor]) -> Params:
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


def _check_finite(trace: torch.Tensor, task_index: int) -> None:
    bad = ~torch.isfinite(trace)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        where = f"after the last step ({step - 1})" if step == len(trace) - 1 else f"at inner step {step}"
        raise InnerLossError(
            f"The support loss of task {task_index} is {trace[step].item()} {where} "
            f"(losses so far: {trace[: step + 1].tolist()}). Lower the inner learning rate, clip the "
            "inner gradients (torchopt.chain(torchopt.clip_grad_norm(1.0), ...)) or check the task's data."
        )
