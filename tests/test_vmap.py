"""The Vmap executor computes what Sequential computes, for every strategy it supports."""

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk
from metakit.executors import Sequential, Vmap, VmapError
from metakit.tasks import SineTasks, mse_loss

STRATEGIES = [
    mk.SecondOrder(),
    mk.SecondOrder(hvp="forward"),
    mk.FirstOrder(),
    mk.Truncated(1),
    mk.Reptile(),
]


pytestmark = pytest.mark.usefixtures("float64")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def run(strategy, executor, *, inner=None, outer=None, optimizer=None, learn_lr=False, inner_only="keep"):
    model = mlp()
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(
            inner or mk.everything(), optimizer or torchopt.sgd(lr=0.1), steps=3, learn_lr=learn_lr
        ),
        outer_params=outer or mk.everything(),
        strategy=strategy,
        executor=executor,
        inner_only=inner_only,
    )
    tasks = SineTasks(k_shot=6, k_query=6, seed=0, dtype=torch.float64).sample(5)
    result = learner.meta_step(tasks, final_support_loss=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"lr:{k}": s.grad.clone() for k, s in learner.lr_scales.items()})
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads, result, values


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_vmap_equals_sequential(strategy, chunk_size):
    expected, reference, _ = run(strategy, Sequential())
    got, result, _ = run(strategy, Vmap(chunk_size=chunk_size))
    assert_same(expected, got)
    torch.testing.assert_close(result.query_losses, reference.query_losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.inner_losses, reference.inner_losses, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", [mk.SecondOrder(), mk.FirstOrder(), mk.Truncated(2)], ids=repr)
def test_vmap_with_outer_only_parameters_and_a_first_task_head(strategy):
    kwargs = dict(inner=mk.select("4.*", "2.*"), outer=mk.select("0.*", "2.*"), inner_only="first_task")
    expected, _, expected_values = run(strategy, Sequential(), **kwargs)
    got, _, values = run(strategy, Vmap(), **kwargs)
    assert_same(expected, got)
    assert_same(expected_values, values)  # the head carried over from the first task


def test_vmap_with_metasgd_and_momentum():
    kwargs = dict(learn_lr=True, optimizer=torchopt.sgd(lr=0.05, momentum=0.9))
    expected, _, _ = run(mk.SecondOrder(), Sequential(), **kwargs)
    got, _, _ = run(mk.SecondOrder(), Vmap(), **kwargs)
    assert_same(expected, got)


def test_tasks_of_different_shapes_are_refused_with_the_shapes():
    model = mlp()
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=1),
        outer_params=mk.everything(),
        strategy=mk.FirstOrder(),
        executor=Vmap(),
    )
    tasks = [
        *SineTasks(k_shot=5, seed=0, dtype=torch.float64).sample(1),
        *SineTasks(k_shot=7, seed=1, dtype=torch.float64).sample(1),
    ]
    with pytest.raises(VmapError, match=r"equal shapes.*\(5, 1\), \(7, 1\).*Pad.*Sequential"):
        learner.meta_step(tasks)


def test_implicit_is_refused_when_the_learner_is_built():
    with pytest.raises(mk.CompositionError, match=r"Vmap\(\).*Implicit.*Sequential"):
        mk.MetaLearner(
            mlp(),
            mse_loss,
            inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=1),
            outer_params=mk.everything(),
            strategy=mk.Implicit(),
            executor=Vmap(),
        )


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        Vmap(chunk_size=chunk_size)
