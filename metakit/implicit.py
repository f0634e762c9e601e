"""iMAML: the implicit meta-gradient of a proximally regularised inner problem, and how well it holds.

The implicit gradient is exact only where the inner problem is solved, so :class:`Implicit` measures
per task how far it is from that: the relative optimality residual
``‖∇L_support(φ) + λ(φ − θ)‖ / ‖∇L_support(θ)‖`` and the conjugate-gradient residual
``‖(I + H/λ) v − b‖ / ‖b‖``. Both land in ``MetaStepResult.diagnostics`` (and TensorBoard); past
``residual_tol`` it warns once, or raises under ``strict=True``. ``max_inner_steps`` keeps stepping
until the optimality residual is below ``residual_tol``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping

import torch
from torchopt.diff.implicit import custom_root
from torchopt.linear_solve import solve_cg

from metakit.functional import double_backward_safe
from metakit.inner import check_finite_trace, fresh_leaves
from metakit.problem import Strategy, TaskGradient, TaskProblem, detached, gradients_by_name

__all__ = ["Implicit", "ImplicitResidualError", "ImplicitResidualWarning"]


class ImplicitResidualWarning(UserWarning):
    """The implicit meta-gradient was computed where the inner problem or the CG solve was unsolved."""


class ImplicitResidualError(RuntimeError):
    """Raised instead of :class:`ImplicitResidualWarning` under ``Implicit(strict=True)``."""


class Implicit(Strategy):
    """iMAML (Rajeswaran et al.): implicit meta-gradient of a proximally regularised inner problem.

    The inner loop minimises ``L_support(φ) + lam/2 ‖φ − θ‖²`` from ``φ = θ``; the meta-gradient
    solves ``(I + H/lam) v = ∇_φ L_query(φ*)`` by conjugate gradient
    (``torchopt.diff.implicit.custom_root``), H the support Hessian at φ*. Outer-only parameters
    get the direct term plus the implicit term through φ*(θ_outer). The gradient is right only where
    φ* solves the inner problem; the residuals say how far it is (see the module docstring).

    Args:
        lam: proximal regularisation strength λ > 0.
        cg_steps: conjugate-gradient iterations.
        rtol, atol: conjugate-gradient tolerances.
        residual_tol: the relative optimality and CG residuals above which the gradient is flagged.
        max_inner_steps: keep taking inner steps past ``InnerLoop.steps``, up to this many in all,
            until the optimality residual is at most ``residual_tol`` (``None``: exactly
            ``InnerLoop.steps``).
        strict: raise :class:`ImplicitResidualError` instead of warning once.

    Example:
        >>> strategy = mk.Implicit(lam=2.0, max_inner_steps=200, residual_tol=1e-2)  # solve to 1 %
    """

    supports_learned_lr = False

    def __init__(
        self,
        lam: float = 1.0,
        cg_steps: int = 10,
        rtol: float = 1e-6,
        atol: float = 0.0,
        *,
        residual_tol: float = 0.05,
        max_inner_steps: int | None = None,
        strict: bool = False,
    ):
        if not lam > 0:
            raise ValueError(f"Implicit(lam=...) must be > 0, got {lam!r}.")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"Implicit(cg_steps=...) must be an int >= 1, got {cg_steps!r}.")
        if not residual_tol > 0:
            raise ValueError(f"Implicit(residual_tol=...) must be > 0, got {residual_tol!r}.")
        if max_inner_steps is not None and (
            isinstance(max_inner_steps, bool) or not isinstance(max_inner_steps, int) or max_inner_steps < 1
        ):
            raise ValueError(
                f"Implicit(max_inner_steps=...) must be None or an int >= 1, got {max_inner_steps!r}."
            )
        self.lam, self.cg_steps, self.rtol, self.atol = float(lam), cg_steps, rtol, atol
        self.residual_tol, self.max_inner_steps, self.strict = float(residual_tol), max_inner_steps, strict
        self._warned = False

    def __repr__(self) -> str:
        extra = f", max_inner_steps={self.max_inner_steps}" if self.max_inner_steps is not None else ""
        return f"Implicit(lam={self.lam}, cg_steps={self.cg_steps}{extra})"

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        inner_names = list(problem.start)
        support, context = problem.inner_inputs(differentiable=True)
        # The context tensors the meta-gradient flows into (outer-only parameters, or the features of
        # a cut with their graph to the backbone) are custom_root inputs; the rest are constants.
        live = {name: value for name, value in context.items() if value.requires_grad}
        frozen = {name: value.detach() for name, value in context.items() if not value.requires_grad}
        outer_only_names = list(live)
        objective, lam = problem.objective, self.lam
        solved: dict[str, torch.Tensor] = {}
        cg_residuals: list[torch.Tensor] = []

        def support_loss(phi, outer_only):
            return objective(
                {
                    **frozen,
                    **dict(zip(outer_only_names, outer_only, strict=True)),
                    **dict(zip(inner_names, phi, strict=True)),
                },
                support,
            )

        def optimality(phi, theta, outer_only):
            # custom_root differentiates this with torch.func transforms, so the support gradient is a
            # torch.func.grad too (torch.autograd.grad cannot see through functorch's wrappers).
            with double_backward_safe():
                grads = torch.func.grad(support_loss)(phi, outer_only)
            return tuple(g + lam * (p - t) for g, p, t in zip(grads, phi, theta, strict=True))

        def solve_and_measure(matvec, b):
            solution = solve_cg(maxiter=self.cg_steps, rtol=self.rtol, atol=self.atol)(matvec, b)
            with torch.no_grad():
                residual = [m - r for m, r in zip(matvec(solution), b, strict=True)]
                cg_residuals.append(_norm(residual) / _norm(b).clamp_min(torch.finfo(_norm(b).dtype).tiny))
            return solution

        @custom_root(optimality, argnums=(1, 2), solve=solve_and_measure)
        def solve(phi, theta, outer_only):
            # custom_root runs this inside autograd.Function.forward, where grad mode is off.
            with torch.enable_grad():
                step_context = {
                    **frozen,
                    **{n: t.detach() for n, t in zip(outer_only_names, outer_only, strict=True)},
                }
                anchors = {name: t.detach() for name, t in zip(inner_names, theta, strict=True)}
                adapted = self._solve_inner(
                    problem, dict(zip(inner_names, phi, strict=True)), step_context, anchors, support
                )
            solved.update(adapted)
            return tuple(adapted["params"][name] for name in inner_names)

        theta = tuple(problem.start.values())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*deprecated", category=FutureWarning)
            phi_star = solve(tuple(t.detach() for t in theta), theta, tuple(live.values()))
            adapted = dict(zip(inner_names, phi_star, strict=True))
            query_loss = problem.query_loss(adapted)
            grads = gradients_by_name(query_loss, {**problem.shared, **problem.outer_only})
        diagnostics = {"optimality_residual": solved["residual"], "inner_steps": solved["steps"]}
        if cg_residuals:
            diagnostics["cg_residual"] = cg_residuals[-1].detach()
        self._check(diagnostics, problem.index)
        return TaskGradient(
            query_loss.detach(), solved["losses"], grads, {}, detached(adapted), diagnostics=diagnostics
        )

    def _solve_inner(self, problem: TaskProblem, start, context, anchors, support) -> dict:
        """Minimise the proximal objective from ``start``; stop at ``max_inner_steps`` or the tolerance."""
        inner, lam = problem.inner, self.lam
        objective = problem.objective
        limit = max(inner.steps, self.max_inner_steps or inner.steps)
        current = fresh_leaves(start)
        state = inner.init(current)
        losses: list[torch.Tensor] = []
        reference = None
        for step in itertools.count():
            grads, loss = inner.gradient(
                current,
                support,
                context,
                objective=objective,
                regularizer=lambda params: _proximal(params, anchors, lam),
                where=f"support loss of task {problem.index} at inner step {step}",
            )
            # At φ = θ the proximal term's gradient is zero: the first gradient is ∇L_support(θ).
            norm = _norm(list(grads.values())).detach()
            reference = norm if reference is None else reference
            residual = norm / reference.clamp_min(torch.finfo(norm.dtype).tiny)
            if step < inner.steps:
                losses.append(loss.detach())
            if step >= inner.steps and (residual <= self.residual_tol or step >= limit):
                losses.append(loss.detach())
                break
            current, state = inner.update(grads, state, current)
            current = fresh_leaves(current)
        trace = torch.stack(losses)
        check_finite_trace(trace, problem.index)
        return {
            "params": {name: value.detach() for name, value in current.items()},
            "losses": trace,
            "residual": residual,
            "steps": torch.tensor(step),
        }

    def _check(self, diagnostics: Mapping[str, torch.Tensor], task_index: int) -> None:
        bad = {
            name: float(diagnostics[name])
            for name in ("optimality_residual", "cg_residual")
            if name in diagnostics and not float(diagnostics[name]) <= self.residual_tol
        }
        if not bad:
            return
        described = ", ".join(f"{name} {value:.3g}" for name, value in bad.items())
        advice = []
        if "optimality_residual" in bad:
            advice.append(
                f"solve the inner problem further (Implicit(max_inner_steps=...) keeps stepping until the "
                f"residual is below {self.residual_tol:g}; more InnerLoop steps or a larger inner learning "
                "rate help too, and a larger lam makes it easier to solve)"
            )
        if "cg_residual" in bad:
            advice.append(f"raise cg_steps (now {self.cg_steps}) or lam (now {self.lam:g})")
        message = (
            f"Implicit: task {task_index}'s meta-gradient was computed where the inner problem is not "
            f"solved ({described}; tolerance {self.residual_tol:g}), so it is not the implicit gradient it "
            f"claims to be. To fix: {'; '.join(advice)}."
        )
        if self.strict:
            raise ImplicitResidualError(message)
        if not self._warned:
            self._warned = True
            warnings.warn(
                message + " (Warned once; Implicit(strict=True) raises instead.)",
                ImplicitResidualWarning,
                stacklevel=4,
            )


def _proximal(
    params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor], lam: float
) -> torch.Tensor:
    return 0.5 * lam * sum(((params[name] - anchors[name]) ** 2).sum() for name in anchors)


def _norm(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach()) for t in tensors]))
