"""Implicit reports how well its inner problem was solved: residuals, a warning (or an error under
strict=True) where the implicit gradient does not hold, and solving to a tolerance."""

import warnings

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk

DIM = 4


pytestmark = pytest.mark.usefixtures("float64")


def regression_tasks(n, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(12, DIM, generator=generator)
        return x, x @ torch.randn(DIM, generator=generator) + 0.1 * torch.randn(12, generator=generator)

    return [mk.Task(batch(), batch()) for _ in range(n)]


def mse(forward, batch):
    x, y = batch
    return ((forward(x).squeeze(-1) - y) ** 2).mean()


def learner(strategy, steps, lr=0.05):
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    return mk.MetaLearner(
        model,
        mse,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=lr), steps=steps),
        outer_params=mk.everything(),
        strategy=strategy,
    )


def proximal_residual(model, task, lam, phi):
    """‖∇L_s(φ) + λ(φ − θ)‖ / ‖∇L_s(θ)‖, written out for the linear model."""
    theta = model.weight.detach()[0]
    x, y = task.support

    def grad_at(w):
        return 2 * x.T @ (x @ w - y) / len(y)

    return (
        torch.linalg.vector_norm(grad_at(phi) + lam * (phi - theta))
        / torch.linalg.vector_norm(grad_at(theta))
    ).item()


def test_unsolved_inner_problem_warns_once_with_the_numbers():
    strategy = mk.Implicit(lam=1.0, cg_steps=10, residual_tol=0.01)
    meta = learner(strategy, steps=1, lr=0.01)
    with pytest.warns(
        mk.ImplicitResidualWarning, match=r"not solved \(optimality_residual 0\.\d+.*max_inner_steps"
    ):
        result = meta.meta_step(regression_tasks(2))
    assert result.diagnostics["optimality_residual"].shape == (2,)
    assert (result.diagnostics["optimality_residual"] > 0.5).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta.meta_step(regression_tasks(2))  # warned once already


def test_unsolved_inner_problem_raises_under_strict():
    meta = learner(mk.Implicit(lam=1.0, residual_tol=0.01, strict=True), steps=1, lr=0.01)
    with pytest.raises(mk.ImplicitResidualError, match=r"task 0.*optimality_residual"):
        meta.meta_step(regression_tasks(1))
    assert all(p.grad is None for p in meta.model.parameters())


def test_solved_inner_problem_is_silent_and_its_residuals_are_right():
    lam = 2.0
    strategy = mk.Implicit(lam=lam, cg_steps=3 * DIM, rtol=1e-12, residual_tol=1e-6)
    meta = learner(strategy, steps=300)
    tasks = regression_tasks(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = meta.meta_step(tasks)
    assert (result.diagnostics["optimality_residual"] < 1e-6).all()
    assert (result.diagnostics["cg_residual"] < 1e-8).all()


def test_max_inner_steps_solves_to_the_tolerance_and_reports_it():
    lam, tol = 2.0, 1e-4
    meta = learner(mk.Implicit(lam=lam, max_inner_steps=1000, residual_tol=tol), steps=2)
    task = regression_tasks(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = meta.meta_step([task])
    steps = int(result.diagnostics["inner_steps"][0])
    assert 2 < steps < 1000
    assert result.inner_losses.shape == (1, 3)  # before each configured step, then at the solution
    reported = float(result.diagnostics["optimality_residual"][0])
    assert reported <= tol
    # The reported residual is the real one: recompute it at the adapted weights, independently.
    phi = meta.adapt(task)  # InnerLoop.steps plain steps: far less solved than Implicit's solution
    assert proximal_residual(meta.model, task, lam, phi["weight"][0]) > tol


def test_residual_options_are_checked():
    with pytest.raises(ValueError, match="residual_tol"):
        mk.Implicit(residual_tol=0)
    with pytest.raises(ValueError, match="max_inner_steps"):
        mk.Implicit(max_inner_steps=0)
