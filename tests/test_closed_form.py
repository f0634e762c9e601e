"""Meta-gradients against closed forms on linear regression (MSE loss, SGD inner loop), in float64.

For L(w) = ‖Xw − y‖² / n the gradient is A w − b with A = 2XᵀX/n, b = 2Xᵀy/n, so S SGD steps of
rate α give w_S = M w_{S-1} + α b with M = I − α A_s, and dw_S/dw_0 = M^S.
"""

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk


@pytest.fixture(autouse=True)
def float64_default():
    """Every tensor in this module is float64; restored afterwards so other tests are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


DIM, ALPHA = 4, 0.1


def mse(forward, batch):
    x, y = batch
    return ((forward(x).squeeze(-1) - y) ** 2).mean()


def make_tasks(n_tasks, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        xs, xq = torch.randn(n, DIM, generator=g), torch.randn(n + 1, DIM, generator=g)
        ys, yq = torch.randn(n, generator=g), torch.randn(n + 1, generator=g)
        tasks.append(mk.Task((xs, ys), (xq, yq)))
    return tasks


def quadratic(batch):
    x, y = batch
    return 2 * x.T @ x / len(x), 2 * x.T @ y / len(x)


def sgd_steps(w, batch, steps):
    a, b = quadratic(batch)
    for _ in range(steps):
        w = w - ALPHA * (a @ w - b)
    return w


def grad_at(w, batch):
    a, b = quadratic(batch)
    return a @ w - b


def closed_form(strategy, w0, task, steps, lam=1.0):
    a_s, b_s = quadratic(task.support)
    eye = torch.eye(DIM)
    m = eye - ALPHA * a_s
    if isinstance(strategy, mk.Implicit):
        w_star = torch.linalg.solve(a_s + lam * eye, b_s + lam * w0)
        return lam * torch.linalg.solve(a_s + lam * eye, grad_at(w_star, task.query))
    w_s = sgd_steps(w0, task.support, steps)
    if isinstance(strategy, mk.Reptile):
        return w0 - w_s
    k = strategy.differentiable_steps(steps)
    return torch.linalg.matrix_power(m, k) @ grad_at(w_s, task.query)


STRATEGIES = [
    mk.SecondOrder(),
    mk.SecondOrder(hvp="forward"),
    mk.SecondOrder(checkpoint=2),
    mk.FirstOrder(),
    mk.Truncated(1),
    mk.Truncated(2),
    mk.Reptile(),
]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_unrolled_strategies_match_closed_form(strategy, steps, n_tasks):
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    learner = mk.MetaLearner(
        model,
        mse,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=ALPHA), steps=steps),
        outer_params=mk.everything(),
        strategy=strategy,
    )
    tasks = make_tasks(n_tasks)
    result = learner.meta_step(tasks)
    w0 = model.weight.detach()[0]
    expected = torch.stack([closed_form(strategy, w0, t, steps) for t in tasks]).mean(0)
    torch.testing.assert_close(model.weight.grad[0], expected, atol=1e-10, rtol=1e-10)
    assert result.inner_losses.shape == (n_tasks, steps + 1)
    w_adapted = sgd_steps(w0, tasks[0].support, steps)
    expected_query = ((tasks[0].query[0] @ w_adapted - tasks[0].query[1]) ** 2).mean()
    torch.testing.assert_close(result.query_losses[0], expected_query)


def test_implicit_matches_closed_form_of_proximal_regression():
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    lam = 2.0
    # Enough inner steps for the proximal problem to converge, enough CG steps to solve exactly.
    learner = mk.MetaLearner(
        model,
        mse,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=300),
        outer_params=mk.everything(),
        strategy=mk.Implicit(lam=lam, cg_steps=DIM * 3, rtol=1e-14),
    )
    tasks = make_tasks(2, seed=3)
    learner.meta_step(tasks)
    w0 = model.weight.detach()[0]
    expected = torch.stack([closed_form(mk.Implicit(lam=lam), w0, t, 0, lam=lam) for t in tasks]).mean(0)
    torch.testing.assert_close(model.weight.grad[0], expected, atol=1e-9, rtol=1e-8)


def test_implicit_differs_from_first_order():
    """Guards the test above against a strategy that silently falls back to first order."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    task = make_tasks(1, seed=3)[0]
    w0 = model.weight.detach()[0]
    lam = 2.0
    implicit = closed_form(mk.Implicit(lam=lam), w0, task, 0, lam=lam)
    a_s, b_s = quadratic(task.support)
    w_star = torch.linalg.solve(a_s + lam * torch.eye(DIM), b_s + lam * w0)
    assert (implicit - grad_at(w_star, task.query)).abs().max() > 1e-3


def test_metasgd_learned_rates_get_the_closed_form_gradient():
    """With per-element scales s (init 1), w_1 = w_0 − α s ⊙ g_s(w_0); dL_q/ds = −α g_s ⊙ g_q(w_1)."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, 1, bias=False)
    learner = mk.MetaLearner(
        model,
        mse,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=ALPHA), steps=1, learn_lr=True),
        outer_params=mk.everything(),
        strategy=mk.SecondOrder(),
    )
    task = make_tasks(1)[0]
    learner.meta_step([task])
    w0 = model.weight.detach()[0]
    w1 = sgd_steps(w0, task.support, 1)
    expected = -ALPHA * grad_at(w0, task.support) * grad_at(w1, task.query)
    (scale,) = learner.lr_scales.values()
    torch.testing.assert_close(scale.grad[0], expected, atol=1e-10, rtol=1e-10)
    assert len(learner.outer_parameters()) == 2
