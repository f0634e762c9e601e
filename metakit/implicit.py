"""iMAML: the implicit meta-gradient of a proximally regularised inner problem, and how well it holds.

The implicit gradient is exact only where the inner problem is solved, so `Implicit` measures
per task how far it is from that: the relative optimality residual
``‖∇L_support(φ) + λ(φ − θ)‖ / ‖∇L_support(θ)‖`` and the conjugate-gradient residual
``‖(I + H/λ) v − b‖ / ‖b‖``. Both land in ``MetaStepResult.diagnostics`` (and TensorBoard); past
``residual_tol`` it warns once, or raises under ``strict=True``. ``max_inner_steps`` keeps stepping
until the optimality residual is below ``residual_tol``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import torch
from torchopt.diff.implicit import custom_root
from torchopt.linear_solve import solve_cg

from metakit.capabilities import Capabilities
from metakit.problem import Strategy, TaskGradient, TaskProblem, gradients_by_name
from metakit.step import InnerStep, Plain, check_finite_trace, detached, fresh_leaves, run_steps

__all__ = ["Implicit", "ImplicitResidualError", "ImplicitResidualWarning"]


class ImplicitResidualWarning(UserWarning):
    """The implicit meta-gradient was computed where the inner problem or the CG solve was unsolved."""


class ImplicitResidualError(RuntimeError):
    """Raised instead of `ImplicitResidualWarning` under ``Implicit(strict=True)``."""


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
        strict: raise `ImplicitResidualError` instead of warning once.

    Example:
        >>> strategy = mk.Implicit(lam=2.0, max_inner_steps=200, residual_tol=1e-2)  # solve to 1 %
    """

    capabilities = Capabilities(double_backward=True, functional=False, learned_lr=False, loss_scaling=False)

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
        # The live context (outer-only parameters, or a cut's features with their graph to the
        # backbone) are custom_root inputs, so the implicit term flows into them.
        step, live = problem.inner_step(differentiable=True)
        live_names = list(live)
        lam = self.lam
        solved: dict[str, torch.Tensor] = {}
        cg_residuals: list[torch.Tensor] = []

        def optimality(phi, theta, live_values):
            # custom_root differentiates this with torch.func transforms: a functional step gradient.
            grads, _ = step.gradient(
                0,
                dict(zip(inner_names, phi, strict=True)),
                dict(zip(live_names, live_values, strict=True)),
                create_graph=True,
                functional=True,
            )
            return tuple(grads[n] + lam * (p - t) for n, p, t in zip(inner_names, phi, theta, strict=True))

        def solve_and_measure(matvec, b):
            solution = solve_cg(maxiter=self.cg_steps, rtol=self.rtol, atol=self.atol)(matvec, b)
            with torch.no_grad():
                residual = [m - r for m, r in zip(matvec(solution), b, strict=True)]
                cg_residuals.append(_norm(residual) / _norm(b).clamp_min(torch.finfo(_norm(b).dtype).tiny))
            return solution

        @custom_root(optimality, argnums=(1, 2), solve=solve_and_measure)
        def solve(phi, theta, live_values):
            # custom_root runs this inside autograd.Function.forward, where grad mode is off.
            with torch.enable_grad():
                anchors = {name: t.detach() for name, t in zip(inner_names, theta, strict=True)}
                proximal = dataclasses.replace(
                    step, regularizer=lambda params: _proximal(params, anchors, lam)
                )
                live_now = {n: v.detach() for n, v in zip(live_names, live_values, strict=True)}
                solved.update(
                    self._solve_inner(problem, proximal, dict(zip(inner_names, phi, strict=True)), live_now)
                )
            return tuple(solved["params"][name] for name in inner_names)

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

    def _solve_inner(self, problem: TaskProblem, step: InnerStep, start: dict, live: dict) -> dict:
        """Minimise the proximal objective from ``start`` through the one loop, until `_Solved`."""
        steps = problem.inner.steps
        stop = _Solved(steps, max(steps, self.max_inner_steps or steps), self.residual_tol)
        params = fresh_leaves(start)
        done = run_steps(
            step,
            params,
            step.init_state(params),
            live,
            None,
            first=0,
            stop=stop,
            runner=Plain(create_graph=False),
        )
        assert done.last is not None  # _Solved probes the gradient at every point
        trace = torch.stack([*done.losses[:steps], done.last[1].detach()])
        check_finite_trace(trace, problem.index)
        return {
            "params": detached(done.params),
            "losses": trace,
            "residual": stop.residual,
            "steps": torch.tensor(done.index),
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


class _Solved:
    """Implicit's stop: after at least ``steps`` steps, once the relative optimality residual
    ``‖∇(L + prox)(φ)‖ / ‖∇L(θ)‖`` is at most ``tol``, or at step ``limit``."""

    def __init__(self, steps: int, limit: int, tol: float):
        self.steps, self.limit, self.tol = steps, limit, tol
        self.reference: torch.Tensor | None = None
        self.residual = torch.tensor(float("nan"))

    def done(self, index: int, probe) -> bool:
        grads, _ = probe()
        # At φ = θ the proximal term's gradient is zero: the first gradient is ∇L_support(θ).
        norm = _norm(list(grads.values())).detach()
        self.reference = norm if self.reference is None else self.reference
        self.residual = norm / self.reference.clamp_min(torch.finfo(norm.dtype).tiny)
        return index >= self.steps and (bool(self.residual <= self.tol) or index >= self.limit)

    def left(self, index: int) -> int:
        return 1


def _proximal(
    params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor], lam: float
) -> torch.Tensor:
    return 0.5 * lam * sum(((params[name] - anchors[name]) ** 2).sum() for name in anchors)


def _norm(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach()) for t in tensors]))
