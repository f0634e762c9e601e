"""Strategies: how the meta-gradient flows from a task's query loss back to the outer parameters.

A strategy is the only thing that changes between gradient approximations. The unrolled family
(:class:`SecondOrder`, :class:`FirstOrder`, :class:`Truncated`) differs only in how many of the last
inner steps are differentiated; :class:`Reptile` and :class:`Implicit` replace the backward pass.

For a parameter in both the inner and the outer set, the meta-gradient is the gradient of the query
loss with respect to its value where the differentiated steps start (the steps before count as
identity). An outer-only parameter (the backbone in priming) gets the gradient of the query loss
through every differentiated step plus its direct term.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchopt.diff.implicit import custom_root
from torchopt.linear_solve import solve_cg

from metakit.functional import bind, double_backward_safe
from metakit.inner import AdaptedParams, InnerLoop, check_scalar_loss
from metakit.task import LossFn, Task

__all__ = [
    "FirstOrder",
    "Implicit",
    "Reptile",
    "SecondOrder",
    "Strategy",
    "TaskGradient",
    "TaskProblem",
    "Truncated",
]

Params = dict[str, torch.Tensor]


@dataclass
class TaskProblem:
    """Everything a strategy needs to compute one task's meta-gradient.

    The four parameter groups partition the model's parameters: ``shared`` (inner ∩ outer),
    ``inner_only``, ``outer_only`` (live tensors), and ``frozen`` (in neither set; detached).
    """

    model: nn.Module
    loss_fn: LossFn
    inner: InnerLoop
    task: Task
    index: int
    shared: Params
    inner_only: Params
    outer_only: Params
    frozen: Params
    lr_scales: Mapping[str, torch.Tensor] | None = None

    @property
    def start(self) -> Params:
        """Initial values of the inner parameters (the learner's current values)."""
        return {**self.shared, **self.inner_only}

    @property
    def context(self) -> Params:
        """The non-inner parameters the forward needs."""
        return {**self.outer_only, **self.frozen}

    def adapt(self, differentiable_steps: int) -> AdaptedParams:
        """Run the inner loop on the task's support batch from the learner's current values."""
        return self.inner.run(
            self.model,
            self.loss_fn,
            self.task.support,
            self.start,
            self.context,
            differentiable_steps=differentiable_steps,
            lr_scales=self.lr_scales,
            task_index=self.index,
        )

    def query_loss(self, adapted: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(bind(self.model, {**self.context, **adapted}, check_names=False), self.task.query)
        check_scalar_loss(loss, f"query loss of task {self.index}")
        return loss


@dataclass
class TaskGradient:
    """One task's contribution: meta-gradients by outer name (and by MetaSGD scale name)."""

    query_loss: torch.Tensor
    inner_losses: torch.Tensor
    grads: Params
    lr_grads: Params
    adapted: Params


class Strategy:
    """Base class: the unrolled meta-gradient through the last ``differentiable_steps`` inner steps."""

    #: Whether outer-only parameters (not adapted in the inner loop) are supported.
    supports_outer_only = True
    #: Whether MetaSGD learning-rate scales receive a gradient.
    supports_learned_lr = True

    def differentiable_steps(self, steps: int) -> int:
        """How many of the last ``steps`` inner steps the meta-gradient goes through."""
        raise NotImplementedError

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        adapted = problem.adapt(self.differentiable_steps(problem.inner.steps))
        query_loss = problem.query_loss(adapted.params)
        targets = {name: adapted.anchor[name] for name in problem.shared}
        targets.update(problem.outer_only)
        lr_scales = dict(problem.lr_scales or {})
        grads = _grad(query_loss, {**targets, **{f"lr:{k}": v for k, v in lr_scales.items()}})
        return TaskGradient(
            query_loss=query_loss.detach(),
            inner_losses=adapted.losses,
            grads={name: grads[name] for name in targets},
            lr_grads={name: grads[f"lr:{name}"] for name in lr_scales},
            adapted=_detached(adapted.params),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SecondOrder(Strategy):
    """Exact meta-gradient: differentiate through every inner step (MAML)."""

    def differentiable_steps(self, steps: int) -> int:
        return steps


class FirstOrder(Strategy):
    """Inner gradients are constants (first-order MAML; the priming paper's choice).

    A parameter in inner ∩ outer gets the query gradient at its adapted value; an outer-only
    parameter gets the direct term of the query loss only.
    """

    supports_learned_lr = False

    def differentiable_steps(self, steps: int) -> int:
        return 0


class Truncated(Strategy):
    """Exact through the last ``k`` inner steps only; the earlier steps count as identity."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Truncated(k) needs an int k >= 1 (steps to differentiate), got {k!r}.")
        self.k = k

    def differentiable_steps(self, steps: int) -> int:
        return min(self.k, steps)

    def __repr__(self) -> str:
        return f"Truncated({self.k})"


class Reptile(Strategy):
    """Reptile (Nichol et al.): the meta-gradient is ``θ − φ``, the step back from the adapted value.

    With an outer SGD step of rate ε this gives Reptile's ``θ ← θ + ε (φ − θ)``. It needs every
    outer parameter to be adapted in the inner loop (outer ⊆ inner).
    """

    supports_outer_only = False
    supports_learned_lr = False

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        adapted = problem.adapt(differentiable_steps=0)
        with torch.no_grad():
            query_loss = problem.query_loss(adapted.params)
            grads = {
                name: value.detach() - adapted.params[name].detach() for name, value in problem.shared.items()
            }
        return TaskGradient(query_loss, adapted.losses, grads, {}, _detached(adapted.params))


class Implicit(Strategy):
    """iMAML (Rajeswaran et al.): implicit meta-gradient of a proximally regularised inner problem.

    The inner loop minimises ``L_support(φ) + lam/2 ‖φ − θ‖²`` from ``φ = θ``; the meta-gradient
    solves ``(I + H/lam) v = ∇_φ L_query(φ*)`` by conjugate gradient
    (``torchopt.diff.implicit.custom_root``), H the support Hessian at φ*. Outer-only parameters
    get the direct term plus the implicit term through φ*(θ_outer).

    Args:
        lam: proximal regularisation strength λ > 0.
        cg_steps: conjugate-gradient iterations.
        rtol, atol: conjugate-gradient tolerances.
    """

    supports_learned_lr = False

    def __init__(self, lam: float = 1.0, cg_steps: int = 10, rtol: float = 1e-6, atol: float = 0.0):
        if not lam > 0:
            raise ValueError(f"Implicit(lam=...) must be > 0, got {lam!r}.")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"Implicit(cg_steps=...) must be an int >= 1, got {cg_steps!r}.")
        self.lam, self.cg_steps, self.rtol, self.atol = float(lam), cg_steps, rtol, atol

    def __repr__(self) -> str:
        return f"Implicit(lam={self.lam}, cg_steps={self.cg_steps})"

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        inner_names = list(problem.start)
        outer_only_names = list(problem.outer_only)
        frozen = problem.frozen
        model, loss_fn, lam = problem.model, problem.loss_fn, self.lam
        support = problem.task.support
        trace: list[torch.Tensor] = []

        def support_loss(phi, outer_only):
            params = {
                **frozen,
                **dict(zip(outer_only_names, outer_only, strict=True)),
                **dict(zip(inner_names, phi, strict=True)),
            }
            return loss_fn(bind(model, params, check_names=False), support)

        def optimality(phi, theta, outer_only):
            # custom_root differentiates this with torch.func transforms, so the support gradient is a
            # torch.func.grad too (torch.autograd.grad cannot see through functorch's wrappers).
            with double_backward_safe():
                grads = torch.func.grad(support_loss)(phi, outer_only)
            return tuple(g + lam * (p - t) for g, p, t in zip(grads, phi, theta, strict=True))

        @custom_root(
            optimality, argnums=(1, 2), solve=solve_cg(maxiter=self.cg_steps, rtol=self.rtol, atol=self.atol)
        )
        def solve(phi, theta, outer_only):
            # custom_root runs this inside autograd.Function.forward, where grad mode is off.
            with torch.enable_grad():
                anchors = {name: t.detach() for name, t in zip(inner_names, theta, strict=True)}
                adapted = problem.inner.run(
                    model,
                    loss_fn,
                    support,
                    dict(zip(inner_names, phi, strict=True)),
                    {**frozen, **{n: t.detach() for n, t in zip(outer_only_names, outer_only, strict=True)}},
                    differentiable_steps=0,
                    task_index=problem.index,
                    regularizer=lambda params: _proximal(params, anchors, lam),
                )
            trace.append(adapted.losses)
            return tuple(adapted.params[name].detach() for name in inner_names)

        theta = tuple(problem.start.values())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*deprecated", category=FutureWarning)
            phi_star = solve(tuple(t.detach() for t in theta), theta, tuple(problem.outer_only.values()))
            adapted = dict(zip(inner_names, phi_star, strict=True))
            query_loss = problem.query_loss(adapted)
            grads = _grad(query_loss, {**problem.shared, **problem.outer_only})
        return TaskGradient(query_loss.detach(), trace[0], grads, {}, _detached(adapted))


def _proximal(
    params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor], lam: float
) -> torch.Tensor:
    return 0.5 * lam * sum(((params[name] - anchors[name]) ** 2).sum() for name in anchors)


def _grad(loss: torch.Tensor, wrt: Mapping[str, torch.Tensor]) -> Params:
    """Gradients of ``loss`` by name; a tensor the loss does not depend on gets zeros."""
    names = [name for name, value in wrt.items() if value.requires_grad]
    grads = torch.autograd.grad(loss, [wrt[name] for name in names], allow_unused=True) if names else ()
    by_name = dict(zip(names, grads, strict=True))
    return {
        name: (by_name.get(name) if by_name.get(name) is not None else torch.zeros_like(value))
        for name, value in wrt.items()
    }


def _detached(params: Mapping[str, torch.Tensor]) -> Params:
    return {name: value.detach() for name, value in params.items()}
