"""Every recipe takes the same keywords and wires them into its learner; a recipe whose strategy is
its identity refuses ``strategy=`` with one clear error."""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk
from metakit import recipes
from metakit.tasks import mse_loss


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(1, 8)
        self.adapter = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.adapter(torch.tanh(self.body(x)))))


ADAPTER, HEAD = mk.select("adapter.*"), mk.select("head.*")
RECIPES = {
    "maml": lambda model, **kw: recipes.maml(model, mse_loss, **kw),
    "anil": lambda model, **kw: recipes.anil(model, mse_loss, head=HEAD, **kw),
    "priming": lambda model, **kw: recipes.priming(model, mse_loss, pe=ADAPTER, head=HEAD, **kw),
    "maml_loop_priming": lambda model, **kw: recipes.maml_loop_priming(
        model, mse_loss, pe=ADAPTER, head=HEAD, **kw
    ),
    "meta_adapters": lambda model, **kw: recipes.meta_adapters(
        model, mse_loss, adapters=ADAPTER, head=HEAD, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_takes_the_common_keywords(name):
    logger, executor, optimizer = object(), mk.executors.Vmap(), torchopt.sgd(lr=0.2)
    keywords = dict(
        inner_lr=0.2,
        steps=2,
        optimizer=optimizer,
        strategy=mk.SecondOrder(),
        learn_lr=True,
        buffers="task",
        logger=logger,
        executor=executor,
        precision="bf16",
        cut=None,
    )
    assert set(keywords) == set(recipes.COMMON_KEYWORDS)  # every documented keyword is exercised
    learner = RECIPES[name](Model(), **keywords)
    assert learner.inner.steps == 2 and learner.inner.learn_lr and learner.inner.buffers == "task"
    assert learner.inner.optimizer is optimizer and repr(learner.strategy) == "SecondOrder()"
    assert learner.executor is executor and learner.logger is logger
    assert learner.precision == "bf16" and learner.cut is None


@pytest.mark.parametrize("name", ["fomaml", "reptile", "imaml"])
def test_a_recipe_named_after_its_strategy_refuses_another_one(name):
    with pytest.raises(
        TypeError, match=rf"recipes\.{name}\(\) is recipes\.maml\(\) with .*recipes\.maml\(\)"
    ):
        getattr(recipes, name)(Model(), mse_loss, strategy=mk.SecondOrder())
