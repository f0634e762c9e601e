"""Hand-written meta-gradients with ``torch.func.functional_call`` and ``torch.autograd.grad``.

- `reference_meta_step`: the yardstick for metakit's overhead and a check of its gradients, the
  plainest code that does the same work as ``MetaLearner.meta_step`` with an SGD inner loop under
  ``SecondOrder`` (and its exact modes) or ``FirstOrder``, without specs, strategies, traces or checks.
- `proximal_reference_gradient`: what ``Implicit`` should compute, the exact gradient of its
  proximal inner problem solved to convergence, by unrolling the solver.

Both deliberately share no code with metakit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metakit.task import LossFn, Task

__all__ = ["ProximalReference", "proximal_reference_gradient", "reference_meta_step"]


def reference_meta_step(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: Sequence[Task],
    inner_names: Sequence[str],
    outer_names: Sequence[str],
    lr: float,
    steps: int,
    second_order: bool,
    head_from_first_task: bool = False,
) -> torch.Tensor:
    """One meta-step: accumulate the mean-over-tasks meta-gradient into ``.grad`` of the outer params.

    Args:
        model: the module; run with ``functional_call``, never modified except ``.grad`` (and the
            head, if ``head_from_first_task``).
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        tasks: the meta-batch.
        inner_names: parameters updated by SGD on the support batch.
        outer_names: parameters that receive the meta-gradient.
        lr: inner SGD learning rate.
        steps: inner SGD steps.
        second_order: keep the graph of the inner gradients (MAML) or treat them as constants (FOMAML).
        head_from_first_task: afterwards set params in ``inner - outer`` to the first task's adapted
            values (priming's Algorithm 1).

    Returns:
        The mean query loss (detached).
    """
    params = dict(model.named_parameters())
    outer = [params[n] for n in outer_names]
    outer_set = set(outer_names)
    first_adapted: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=outer[0].device)
    # Fused attention kernels have no double backward; the math kernel computes the same function.
    attention = sdpa_kernel([SDPBackend.MATH]) if second_order else contextlib.nullcontext()
    with attention:
        for index, task in enumerate(tasks):
            fast = {n: params[n] for n in inner_names}
            for _ in range(steps):
                loss = loss_fn(_bound(model, params, fast), task.support)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
                fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
            query_loss = loss_fn(_bound(model, params, fast), task.query)
            torch.autograd.backward(query_loss / len(tasks), inputs=outer)
            total += query_loss.detach()
            if index == 0:
                first_adapted = {n: w.detach() for n, w in fast.items() if n not in outer_set}
    if head_from_first_task:
        with torch.no_grad():
            for name, value in first_adapted.items():
                params[name].copy_(value)
    return total / len(tasks)


def _bound(model: nn.Module, params: dict, fast: dict) -> Callable:
    merged = {**params, **fast}
    return lambda *args, **kwargs: functional_call(model, merged, args, kwargs)


@dataclass
class ProximalReference:
    """The exact meta-gradient of the proximal inner problem, and how well it was converged.

    Attributes:
        grads: mean-over-tasks meta-gradient of the outer parameters, by name.
        optimality_residual: largest over tasks of ``‖∇L_support(φ) + λ(φ − θ)‖ / ‖∇L_support(θ)‖``
            at the solution used.
        solver_steps: largest number of gradient-descent steps a task's solve took.
        adjoint_steps: largest number of unrolled steps a task's backward pass took.
        converged: every task reached ``tol`` in both passes.
        step_sizes: the gradient-descent step size used per task.
    """

    grads: dict[str, torch.Tensor]
    optimality_residual: float
    solver_steps: int
    adjoint_steps: int
    converged: bool
    step_sizes: list[float] = field(default_factory=list)


def proximal_reference_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: Sequence[Task],
    inner_names: Sequence[str],
    outer_names: Sequence[str],
    lam: float,
    max_step_size: float = math.inf,
    tol: float = 1e-4,
    max_steps: int = 2_000,
    patience: int = 200,
) -> ProximalReference:
    """Meta-gradient of ``L_query(φ*(θ))``, φ* the minimiser of ``L_support(φ) + lam/2 ‖φ − θ‖²``.

    This is the exact gradient of gradient descent on the proximal problem, started at φ = θ and run
    until it converges. Every step of that loop is ``Φ(φ, θ) = φ − α(∇L_support(φ) + λ(φ − θ))``; once
    φ stops moving, the rest of the loop's reverse pass is the same step's vector-Jacobian product
    again and again, so it is run at φ* until the vector it carries has decayed below ``tol``
    (memory of one step, however many steps converging takes). That limit does not depend on α, so
    each pass takes α from the support Hessian's largest eigenvalue (power iteration) to converge fast.
    No conjugate gradient and no implicit-function formula are involved, so it checks ``Implicit``'s.

    Gradient descent may stall short of ``tol`` where the loss is not smooth (a ReLU network's kinks
    make it bounce); the solve then stops after ``patience`` steps without a new best residual and
    reports the residual it reached, and ``converged`` is False.

    Args:
        model: the module (not modified).
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        tasks: the meta-batch; the gradient is the mean over tasks.
        inner_names: the parameters φ of the inner problem (anchored at their current values θ).
        outer_names: the parameters that get the meta-gradient (outer-only ones via the mixed term).
        lam: the proximal strength λ.
        max_step_size: upper bound on the solve's step size (the workload's inner learning rate).
        tol: relative tolerance of the solve (optimality residual) and of the backward pass; the
            default suits float32, whose rounding stalls the solve near 1e-5.
        max_steps: cap on each pass; a pass that reaches it leaves ``converged`` False.
        patience: stop a pass after this many steps without progress (a new best residual in the
            solve, a smaller carried vector in the backward pass).

    Returns:
        A `ProximalReference`.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    inner_set = set(inner_names)
    outer_only = [n for n in outer_names if n not in inner_set]
    totals = {n: torch.zeros_like(params[n]) for n in outer_names}
    worst_residual, solver_steps, adjoint_steps, converged, step_sizes = 0.0, 0, 0, True, []
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention has no double backward
        for task in tasks:
            task_loss = task.loss_fn or loss_fn
            theta = {n: params[n] for n in inner_names}
            frozen = {n: v for n, v in params.items() if n not in inner_set and n not in outer_only}

            def loss(phi: dict, w: dict, batch, frozen=frozen, task_loss=task_loss) -> torch.Tensor:
                merged = {**frozen, **w, **phi}
                return task_loss(lambda *args, **kwargs: functional_call(model, merged, args, kwargs), batch)

            w = {n: params[n].clone().requires_grad_(True) for n in outer_only}
            phi, step, residual, steps = _solve_proximal(
                loss, theta, w, task.support, lam, max_step_size, tol, max_steps, patience
            )
            step_sizes.append(step)
            worst_residual, solver_steps = max(worst_residual, residual), max(solver_steps, steps)
            converged &= residual <= tol

            phi = {n: v.detach().requires_grad_(True) for n, v in phi.items()}
            support_grads = torch.autograd.grad(
                loss(phi, w, task.support), list(phi.values()), create_graph=True
            )
            step = 1.0 / (lam + 1.5 * _largest_curvature(support_grads, list(phi.values())))
            query_loss = loss(phi, w, task.query)
            query_grads = torch.autograd.grad(query_loss, [*phi.values(), *w.values()], allow_unused=True)
            carried = list(query_grads[: len(phi)])  # the vector the reverse pass carries into φ
            grad_theta = [torch.zeros_like(v) for v in carried]
            grad_w = [
                torch.zeros_like(v) if g is None else g
                for g, v in zip(query_grads[len(phi) :], w.values(), strict=True)
            ]
            best_size, best_at = math.inf, 0
            for k in range(max_steps):
                for total, v in zip(grad_theta, carried, strict=True):
                    total.add_(v, alpha=step * lam)  # ∂Φ/∂θ = αλ I
                products = torch.autograd.grad(
                    support_grads, [*phi.values(), *w.values()], carried, retain_graph=True, allow_unused=True
                )
                for total, mixed in zip(grad_w, products[len(phi) :], strict=True):
                    if mixed is not None:
                        total.sub_(mixed, alpha=step)  # ∂Φ/∂w = −α ∂∇L_support/∂w
                carried = [
                    v - step * (hv + lam * v) for v, hv in zip(carried, products[: len(phi)], strict=True)
                ]
                if _norm(carried) <= tol * max(_norm(grad_theta), 1e-30):
                    break
                size = _norm(carried)
                if size < best_size:
                    best_size, best_at = size, k
                elif k - best_at > patience:  # not contracting: I + H/λ is singular or indefinite at φ*
                    converged = False
                    break
            else:
                converged = False
            adjoint_steps = max(adjoint_steps, k + 1)
            for name, g in zip(phi, grad_theta, strict=True):
                if name in totals:
                    totals[name] += g / len(tasks)
            for name, g in zip(w, grad_w, strict=True):
                totals[name] += g / len(tasks)
    return ProximalReference(totals, worst_residual, solver_steps, adjoint_steps, converged, step_sizes)


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def _solve_proximal(
    loss,
    theta: dict,
    w: dict,
    batch,
    lam: float,
    max_step_size: float,
    tol: float,
    max_steps: int,
    patience: int,
):
    """Gradient descent on ``loss + lam/2 ‖φ − θ‖²`` from θ; returns (best φ, step, its residual, steps)."""

    def support_grad(phi: dict, create_graph: bool = False) -> list[torch.Tensor]:
        phi = {n: v.detach().requires_grad_(True) for n, v in phi.items()}
        return list(
            torch.autograd.grad(loss(phi, w, batch), list(phi.values()), create_graph=create_graph)
        ), phi

    grads, leaves = support_grad(theta, create_graph=True)
    scale = max(_norm(grads), 1e-30)
    step = min(max_step_size, 1.0 / (lam + 1.5 * _largest_curvature(grads, list(leaves.values()))))
    while True:  # halve the step if the Hessian grows along the path and the iteration diverges
        phi, best, best_phi, best_at = dict(theta), math.inf, dict(theta), 0
        for steps in range(1, max_steps + 1):
            grads, _ = support_grad(phi)
            optimality = [
                g + lam * (p - t) for g, p, t in zip(grads, phi.values(), theta.values(), strict=True)
            ]
            residual = _norm(optimality) / scale
            if residual < best:
                best, best_phi, best_at = residual, phi, steps
            if (
                residual <= tol
                or residual > 100 * best
                or not math.isfinite(residual)
                or steps - best_at > patience
            ):
                break
            phi = {n: p - step * o for (n, p), o in zip(phi.items(), optimality, strict=True)}
        if residual <= 100 * best and math.isfinite(residual):
            return best_phi, step, best, steps
        step /= 2


def _largest_curvature(
    grads: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], iterations: int = 20
) -> float:
    """Power iteration: the largest |eigenvalue| of the Hessian whose gradient graph is ``grads``."""
    generator = torch.Generator().manual_seed(0)
    vector = [torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for v in grads]
    eigenvalue = 0.0
    for _ in range(iterations):
        length = max(_norm(vector), 1e-30)
        vector = [v / length for v in vector]
        product = torch.autograd.grad(grads, list(wrt), vector, retain_graph=True)
        eigenvalue = _norm(product)
        vector = list(product)
    return eigenvalue
