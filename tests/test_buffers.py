"""Buffers in the inner loop: BatchNorm statistics updated in place, per task, or frozen."""

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def ce(forward, batch):
    x, y = batch
    return nn.functional.cross_entropy(forward(x), y)


def tasks(n=2):
    generator = torch.Generator().manual_seed(0)

    def batch():
        return torch.randn(5, 1, 6, 6, generator=generator) * 3 + 1, torch.randint(
            0, 3, (5,), generator=generator
        )

    return [mk.Task(batch(), batch()) for _ in range(n)]


def learner(model, buffers, strategy=None):
    return mk.MetaLearner(
        model,
        ce,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=3, buffers=buffers),
        outer_params=mk.everything(),
        strategy=strategy or mk.SecondOrder(),
    )


def buffers_of(model):
    return {name: value.clone() for name, value in model.named_buffers()}


def test_update_moves_the_module_statistics_at_every_forward():
    model = cnn()
    learner(model, "update").meta_step(tasks(2))
    # 2 tasks x (3 inner steps + 1 query forward)
    assert int(model[1].num_batches_tracked) == 8


@pytest.mark.parametrize("strategy", [mk.SecondOrder(), mk.FirstOrder()], ids=repr)
def test_task_keeps_the_module_buffers_untouched(strategy):
    model = cnn()
    before = buffers_of(model)
    learner(model, "task", strategy).meta_step(tasks(2))
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(p.grad is not None for p in model.parameters())


def test_task_copies_are_independent_and_see_their_own_updates():
    # The first task's result does not depend on a second task run before it: no leak across tasks.
    first, second = tasks(2)
    model = cnn()
    alone = learner(model, "task").meta_step([first]).query_losses[0]
    model = cnn()
    after_other = learner(model, "task").meta_step([second, first]).query_losses[1]
    torch.testing.assert_close(after_other, alone, rtol=0, atol=0)


def test_frozen_adapts_with_running_statistics_and_updates_nothing_during_adaptation():
    model = cnn()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    task = tasks(1)[0]
    meta = learner(model, "frozen")
    before = buffers_of(model)
    adapted = meta.adapt(task)
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # The inner loop's first loss is the eval-mode loss (running statistics), not the batch-statistics one.
    model.eval()
    with torch.no_grad():
        eval_loss = ce(model, task.support)
    model.train()
    with torch.no_grad():
        batch_stats_loss = ce(mk.bind(model, {}, buffers=buffers_of(model)), task.support)
    result = meta.meta_step([task], final_support_loss=True)
    torch.testing.assert_close(result.inner_losses[0, 0], eval_loss)
    assert not torch.allclose(batch_stats_loss, eval_loss)
    assert adapted.keys() == dict(model.named_parameters()).keys()
    assert model[1].training  # the flag is restored after every forward


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"buffers=.*'update', 'task', 'frozen'"):
        mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=1, buffers="per-step")
