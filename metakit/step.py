"""One inner step, defined once, and the one loop over inner steps.

`InnerStep` is what an inner step *means* for one task: the objective on one params dict
(with the task's buffer policy, its precision and, under a cut, only the top of the model), the
context (the other parameters and cached features: constants, and the *live* tensors the
meta-gradient flows into), the MetaSGD scales, the loss scale, a regularizer and the error messages.
Every way of running a step calls it: plain, with ``create_graph``, as a forward-over-reverse op or
recomputed in a segment (`metakit.lean`), batched under ``vmap`` (``functional=True``: the
gradient is a ``torch.func.grad``), or inside Implicit's solve.

`run_steps` is the one loop. A *runner* says how a step runs (`Plain`, or the lean
runners, which run ``chunk`` steps as one autograd op); a *stop* says when the loop ends
(`FixedSteps`, or Implicit's residual rule, which looks at each step's gradient through a
probe). `unroll` runs an inner loop the way the unrolled strategies need it: a first-order
prefix, then the differentiated steps, anchored so that the prefix counts as identity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import optree
import torch
from torch.autograd import forward_ad

from metakit.buffers import TaskBuffers, eval_statistics
from metakit.functional import double_backward_safe
from metakit.precision import scaled_grad

__all__ = [
    "FixedSteps",
    "InnerLossError",
    "InnerStep",
    "Plain",
    "Runner",
    "Steps",
    "Stop",
    "check_finite_trace",
    "check_scalar_loss",
    "detached",
    "fresh_leaves",
    "run_steps",
    "unroll",
]

Params = dict[str, torch.Tensor]
#: ``forward(params, batch, buffers) -> scalar``: the loss of the model run on ``params`` and ``buffers``.
Forward = Callable[[Mapping[str, torch.Tensor], Any, Mapping[str, torch.Tensor]], torch.Tensor]
#: ``regularizer(inner_params) -> scalar``: a term added to the differentiated loss, not to the trace.
Regularizer = Callable[[Params], torch.Tensor]


class InnerLossError(FloatingPointError):
    """The support loss became NaN or infinite during the inner loop."""


@dataclass
class InnerStep:
    """What one inner step of one task means; every way of running a step calls this.

    Attributes:
        inner: the `InnerLoop` (``init`` and ``update`` of its TorchOpt optimizer).
        forward: ``forward(params, batch, buffers) -> loss`` (the model, or its top under a cut, in
            the task's precision).
        model: the module (its BatchNorm layers are switched to running statistics under ``"frozen"``).
        buffers: the task's buffers under its policy.
        batch: the support batch.
        constants: context tensors the meta-gradient does not flow into (detached).
        loss_scale: float16 loss scaling of the gradients (``None``: none).
        regularizer: added to the differentiated loss (iMAML's proximal term), not to the trace.
        task_index: the task's place in the meta-batch (error messages).
    """

    inner: Any
    forward: Forward
    model: torch.nn.Module
    buffers: TaskBuffers
    batch: Any
    constants: Params = field(default_factory=dict)
    loss_scale: float | None = None
    regularizer: Regularizer | None = None
    task_index: int = 0

    def where(self, index: int) -> str:
        return f"support loss of task {self.task_index} at inner step {index}"

    def loss(
        self,
        params: Mapping[str, torch.Tensor],
        live: Mapping[str, torch.Tensor],
        *,
        batch: Any = None,
        adapting: bool = True,
        replay: bool = False,
        where: str = "support loss",
    ) -> torch.Tensor:
        """The loss at ``params`` with the ``live`` context, on the support batch (or ``batch``)."""
        buffers, running = self.buffers.for_forward(adapting=adapting, replay=replay)
        with eval_statistics(self.model, running):
            loss = self.forward(
                {**self.constants, **live, **params}, self.batch if batch is None else batch, buffers
            )
        check_scalar_loss(loss, where)
        return loss

    def gradient(
        self,
        index: int,
        params: Mapping[str, torch.Tensor],
        live: Mapping[str, torch.Tensor],
        *,
        create_graph: bool,
        functional: bool = False,
        replay: bool = False,
    ) -> tuple[Params, torch.Tensor]:
        """The gradient of the support loss (plus the regularizer) at ``params``: ``(grads, loss)``.

        ``functional`` takes it with ``torch.func.grad`` (under ``vmap`` and other transforms, where a
        graph is implicit), else with ``torch.autograd.grad``. ``loss`` is not detached.
        """
        params, where, scale = dict(params), self.where(index), self.loss_scale
        if functional:

            def scaled(inner: Params) -> tuple[torch.Tensor, torch.Tensor]:
                loss = self.loss(inner, live, replay=True, where=where)
                total = self._regularized(loss, inner)
                return (total * scale if scale is not None else total), loss

            with double_backward_safe(create_graph):
                grads, loss = torch.func.grad(scaled, has_aux=True)(params)
            return _unscaled(grads, scale), loss
        with double_backward_safe(create_graph):
            loss = self.loss(params, live, replay=replay, where=where)
        total = self._regularized(loss, params)
        grads = scaled_grad(total, tuple(params.values()), scale, create_graph=create_graph)
        return dict(zip(params, grads, strict=True)), loss

    def hessian_vector_products(
        self,
        index: int,
        params: Params,
        tangents: Params,
        live: Params,
        fixed: Params | None = None,
    ) -> tuple[Params, dict[str, torch.Tensor | None]]:
        """``(H_pp v, H_cp v)`` at ``params`` along ``tangents`` ``v``, by forward over reverse.

        One backward pass of the support loss (a replayed forward) on dual tensors
        (``torch.autograd.forward_ad``): the gradient's tangent along ``v`` is the Hessian-vector
        product, and the tangent of the gradient of each ``live`` tensor is its mixed term (``None``
        where the gradient does not depend on ``params``). The backward pass builds no graph, so it
        holds one forward pass's activations and their tangents, no more. ``fixed``: live tensors
        the loss reads but whose mixed term is not wanted (it is zero: the loss does not depend on
        them differentiably), passed as constants so that no zero gradient is formed for them.
        """
        where, scale = self.where(index), self.loss_scale
        with torch.enable_grad(), forward_ad.dual_level():
            duals = {
                name: forward_ad.make_dual(p.detach(), tangents[name].detach()).requires_grad_(True)
                for name, p in params.items()
            }
            outer = {name: c.detach().requires_grad_(True) for name, c in live.items()}
            loss = self._regularized(
                self.loss(duals, {**(fixed or {}), **outer}, replay=True, where=where), duals
            )
            if scale is not None:
                loss = loss * scale
            grads = torch.autograd.grad(loss, [*duals.values(), *outer.values()], allow_unused=True)
            products = [None if g is None else forward_ad.unpack_dual(g).tangent for g in grads]
        products = [None if t is None else (t / scale if scale is not None else t) for t in products]
        inner = {
            name: torch.zeros_like(p) if t is None else t
            for (name, p), t in zip(params.items(), products[: len(duals)], strict=True)
        }
        mixed = dict(zip(outer, products[len(duals) :], strict=True))
        return inner, mixed

    def init_state(self, params: Mapping[str, torch.Tensor]) -> Any:
        """The optimizer state for ``params``; per task under ``vmap`` (TorchOpt writes some of it in place)."""
        state = self.inner.init(detached(params))
        zero = self.buffers.batched_like
        if zero is None:
            return state
        return optree.tree_map(
            lambda v: v + zero.to(v.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
            state,
        )

    def update(
        self,
        grads: Mapping[str, torch.Tensor],
        state: Any,
        params: Mapping[str, torch.Tensor],
        lr_scales: Mapping[str, torch.Tensor] | None,
    ) -> tuple[Params, Any]:
        """The optimizer's update (scaled by the MetaSGD scales): ``(new params, new state)``."""
        return self.inner.update(grads, state, params, lr_scales or None)

    def final_loss(
        self, params: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The support loss at ``params`` without a graph (the trace's last entry); writes no buffer."""
        with torch.no_grad():
            return self.loss(detached(params), detached(live), replay=True).detach()

    def _regularized(self, loss: torch.Tensor, params: Params) -> torch.Tensor:
        return loss + self.regularizer(params) if self.regularizer is not None else loss


# -- how a step runs --------------------------------------------------------------------------------
class Runner(Protocol):
    """How the loop runs its next ``count`` steps (at most ``chunk``).

    A runner used with a stop that probes the gradient (Implicit's) also has
    ``gradient(step, index, params, live)``, as `Plain` does; the chunked lean runners run with
    `FixedSteps` only.
    """

    chunk: int

    def run(
        self,
        step: InnerStep,
        index: int,
        count: int,
        params: Params,
        state: Any,
        live: Params,
        lr: Params | None,
        gradient: tuple[Params, torch.Tensor] | None = None,
    ) -> tuple[Params, Any, list[torch.Tensor]]:
        """``(params, state, losses)`` after ``count`` steps from step ``index``."""


@dataclass(frozen=True)
class Plain:
    """One step as it is: its gradient with or without a graph, then the optimizer's update.

    Attributes:
        create_graph: keep the gradient's graph, so the step can be differentiated; otherwise the
            step starts from constants and its result is a fresh leaf.
        functional: gradients by ``torch.func.grad`` (under ``vmap``) instead of ``autograd.grad``.
        replay: the step runs again (a recomputed segment): throw-away buffers.
    """

    create_graph: bool
    functional: bool = False
    replay: bool = False
    chunk: int = 1

    def run(self, step, index, count, params, state, live, lr, gradient=None):
        if gradient is None:
            gradient = self.gradient(step, index, params, live)
        grads, loss = gradient
        if not self.create_graph:
            grads, params = detached(grads), detached(params)
        params, state = step.update(grads, state, params, lr)
        if not self.create_graph:
            params = detached(params) if self.functional else fresh_leaves(params)
        return params, state, [loss.detach()]

    def gradient(self, step: InnerStep, index: int, params: Params, live: Params):
        return step.gradient(
            index,
            params,
            live,
            create_graph=self.create_graph,
            functional=self.functional,
            replay=self.replay,
        )


# -- when the loop stops ----------------------------------------------------------------------------
class Stop(Protocol):
    """When the loop ends: ``done(index, probe)``; ``probe()`` is the gradient and loss at the current
    point (computed once, and reused for the step if the loop goes on)."""

    def done(self, index: int, probe: Callable[[], tuple[Params, torch.Tensor]]) -> bool: ...

    def left(self, index: int) -> int:
        """How many steps may run from ``index`` without asking again."""


@dataclass(frozen=True)
class FixedSteps:
    """Stop at step ``end``."""

    end: int

    def done(self, index, probe) -> bool:
        return index >= self.end

    def left(self, index: int) -> int:
        return self.end - index


# -- the one loop -----------------------------------------------------------------------------------
@dataclass
class Steps:
    """What `run_steps` ran to: the parameters and state, the loss before each step, where it
    stopped and, if the stop probed it, the gradient and loss at the last point."""

    params: Params
    state: Any
    losses: list[torch.Tensor]
    index: int
    last: tuple[Params, torch.Tensor] | None = None


def run_steps(
    step: InnerStep,
    params: Params,
    state: Any,
    live: Params,
    lr: Params | None,
    *,
    first: int,
    stop: Stop,
    runner: Runner,
) -> Steps:
    """The one loop over inner steps: from step ``first`` until ``stop``, each run by ``runner``."""
    index, losses = first, []
    while True:
        probed: list[tuple[Params, torch.Tensor]] = []

        def probe(index=index, params=params, probed=probed):
            if not probed:
                probed.append(runner.gradient(step, index, params, live))  # type: ignore[attr-defined]
            return probed[0]

        if stop.done(index, probe):
            return Steps(params, state, losses, index, probed[0] if probed else None)
        count = min(runner.chunk, stop.left(index))
        params, state, new = runner.run(
            step, index, count, params, state, live, lr, probed[0] if probed else None
        )
        losses.extend(new)
        index += count


def unroll(
    step: InnerStep,
    start: Params,
    live: Params,
    lr: Params | None,
    *,
    steps: int,
    differentiable_steps: int,
    runner: Runner,
    functional: bool = False,
    trace_final: bool = True,
) -> tuple[Params, torch.Tensor, Any]:
    """An inner loop of ``steps`` steps whose last ``differentiable_steps`` are run by ``runner``.

    The steps before see constants (detached context and scales). Where the differentiated steps
    start, the parameters are re-anchored on ``start``: ``φ.detach() + (start - start.detach())``, so that for
    a parameter of ``start`` the steps before count as identity and its meta-gradient is taken
    with respect to ``start`` itself, under ``autograd`` and ``torch.func`` alike.

    Returns:
        ``(adapted params, trace, optimizer state)``: the trace is the support loss before each step
        and after the last (NaN unless ``trace_final``), checked finite.
    """
    first = steps - min(max(differentiable_steps, 0), steps)
    plain = Plain(create_graph=False, functional=functional)
    params = dict(start)
    if first > 0:
        params = detached(params) if functional else fresh_leaves(params)
    state = step.init_state(params)
    prefix = run_steps(
        step,
        params,
        state,
        detached(live),
        _detached_or_none(lr),
        first=0,
        stop=FixedSteps(first),
        runner=plain,
    )
    params, state, losses = prefix.params, prefix.state, prefix.losses
    if first > 0:
        params = _anchored(params, start)
    if first < steps:
        rest = run_steps(step, params, state, live, lr, first=first, stop=FixedSteps(steps), runner=runner)
        params, state, losses = rest.params, rest.state, losses + rest.losses
    losses.append(step.final_loss(params, live) if trace_final else torch.full_like(losses[0], float("nan")))
    trace = torch.stack(losses)
    if not functional:  # under vmap the executor checks each task's trace after the batch
        check_finite_trace(trace if trace_final else trace[:-1], step.task_index, has_final=trace_final)
    return params, trace, state


def _anchored(params: Params, start: Params) -> Params:
    """``φ.detach() + (start - start.detach())``: exactly the value of φ (``x - x`` is exactly zero),
    with the gradient of ``start`` (identity)."""
    return {name: value.detach() + (start[name] - start[name].detach()) for name, value in params.items()}


def _detached_or_none(lr: Params | None) -> Params | None:
    return detached(lr) if lr else None


def _unscaled(grads: Params, scale: float | None) -> Params:
    return grads if scale is None else {name: g / scale for name, g in grads.items()}


def detached(params: Mapping[str, torch.Tensor]) -> Params:
    """``params`` without autograd history."""
    return {name: value.detach() for name, value in params.items()}


def fresh_leaves(params: Mapping[str, torch.Tensor]) -> Params:
    """Detached copies of ``params`` that require grad: the start of a new graph."""
    return {
        name: value.detach().requires_grad_(True) if value.is_floating_point() else value.detach()
        for name, value in params.items()
    }


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
    """Raise `InnerLossError` at the first non-finite support loss of ``trace``.

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
