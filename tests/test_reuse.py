"""Feature reuse: the meta-gradient with a cut equals the one without, in float64, under every
strategy; the bottom runs once per batch; declared cuts are checked."""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

import metakit as mk
from metakit import recipes
from metakit.peft import add_top_adapter, feature_cut, head_spec

LABELS = 3
TINY = dict(
    num_hidden_layers=2,
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    vocab_size=50,
    max_position_embeddings=32,
    num_labels=LABELS,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
STRATEGIES = [
    mk.SecondOrder(),
    mk.SecondOrder(hvp="forward"),
    mk.SecondOrder(checkpoint=2),
    mk.FirstOrder(),
    mk.Truncated(1),
    mk.Implicit(lam=1.0, cg_steps=5, residual_tol=10.0),  # exactness of reuse, not of the solve
]


pytestmark = pytest.mark.usefixtures("float64")


def loss_fn(forward, batch):
    return forward(**batch).loss


def tasks(n=2, seed=0, sequence=False):
    generator = torch.Generator().manual_seed(seed)

    def batch():
        ids = torch.randint(5, 50, (3, 7), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        if sequence:
            labels = torch.randint(0, LABELS, (3,), generator=generator)
        else:
            labels = torch.randint(0, LABELS, (3, 7), generator=generator).masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return [mk.Task(batch(), batch()) for _ in range(n)]


def tiny(cls=BertForTokenClassification, adapter=True):
    torch.manual_seed(0)
    model = cls(BertConfig(**TINY)).to(torch.float64).eval()
    spec = add_top_adapter(model, bottleneck=4) if adapter else None
    return model, spec


def grads(learner, batch):
    learner.model.zero_grad()
    result = learner.meta_step(batch)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}, result


def assert_same(expected, got):
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def count_encoder_runs(model):
    runs = []
    model.bert.embeddings.register_forward_pre_hook(lambda *args: runs.append(1))
    return runs


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_priming_with_reuse_equals_without(strategy):
    batch = tasks()
    results = {}
    for cut in ("auto", None):
        model, adapter = tiny()
        learner = recipes.priming(
            model, loss_fn, pe=adapter, head=head_spec(model), steps=3, strategy=strategy
        )
        if cut is None:
            learner.cut = None
        else:
            assert learner.cut is not None and learner.cut.at.endswith("LayerNorm.top_adapter")
        runs = count_encoder_runs(model)
        results[cut] = (*grads(learner, batch), len(runs))
    (with_cut, result, runs), (without, reference, full_runs) = results["auto"], results[None]
    assert any(name.startswith("bert.encoder.layer.0") for name in with_cut)  # the backbone gets its gradient
    assert_same(without, with_cut)
    torch.testing.assert_close(result.query_losses, reference.query_losses, rtol=1e-12, atol=0)
    # Once per support batch and once per query batch, per task (Implicit's custom_root adds none).
    assert runs == 2 * len(batch)
    assert full_runs > runs


@pytest.mark.parametrize("strategy", [*STRATEGIES, mk.Reptile()], ids=repr)
def test_head_only_inner_loop_with_reuse_equals_without(strategy):
    batch = tasks(seed=1)
    found = []
    for cut in ("auto", None):
        model, _ = tiny(adapter=False)
        head = head_spec(model)
        outer = head if isinstance(strategy, mk.Reptile) else mk.everything()
        learner = mk.MetaLearner(
            model,
            loss_fn,
            inner=mk.InnerLoop(head, torchopt.sgd(lr=0.1), steps=3),
            outer_params=outer,
            strategy=strategy,
            cut=cut,
        )
        assert (learner.cut is None) == (cut is None)
        found.append(grads(learner, batch)[0])
    assert learner.cut is None and mk.peft.feature_cut(model, head_spec(model)).at == "dropout"
    assert_same(found[1], found[0])


def test_sequence_classification_with_top_adapter():
    batch = tasks(sequence=True)
    found = []
    for cut in ("auto", None):
        model, adapter = tiny(BertForSequenceClassification)
        learner = recipes.priming(
            model, loss_fn, pe=adapter, head=head_spec(model), steps=2, strategy=mk.SecondOrder()
        )
        if cut is None:
            learner.cut = None
        found.append(grads(learner, batch)[0])
    assert_same(found[1], found[0])


def test_adapt_with_reuse_equals_without():
    model, adapter = tiny()
    learner = recipes.meta_adapters(model, loss_fn, adapters=adapter, head=head_spec(model), steps=3)
    assert learner.cut is not None
    task = tasks(1)[0]
    with_cut = learner.adapt(task)
    learner.cut = None
    without = learner.adapt(task)
    assert_same(without, with_cut)


def test_no_cut_where_the_inner_loop_reaches_below_the_top():
    model, adapter = tiny()
    assert feature_cut(model, adapter | head_spec(model) | mk.select("bert.encoder.layer.1.*")) is None
    learner = recipes.maml_loop_priming(model, loss_fn, pe=adapter, head=head_spec(model))
    assert learner.cut is None


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        return self.head(self.body(x))


def sine_loss(forward, batch):
    x, y = batch
    return ((forward(x) - y) ** 2).mean()


def declared_cut():
    return mk.Cut(at="head", rest=lambda run, features, x: run("head")(features))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=repr)
def test_a_declared_cut_on_any_module(strategy):
    data = mk.tasks.SineTasks(k_shot=5, k_query=5, seed=0, dtype=torch.float64).sample(3)
    found = []
    for cut in (declared_cut(), None):
        torch.manual_seed(0)
        model = Encoder()
        learner = mk.MetaLearner(
            model,
            sine_loss,
            inner=mk.InnerLoop(mk.select("head.*"), torchopt.sgd(lr=0.1), steps=3),
            outer_params=mk.everything(),
            strategy=strategy,
            cut=cut,
        )
        found.append(grads(learner, data)[0])
    assert_same(found[1], found[0])


def test_an_inner_parameter_below_the_cut_is_named():
    torch.manual_seed(0)
    learner = mk.MetaLearner(
        Encoder(),
        sine_loss,
        inner=mk.InnerLoop(mk.select("head.*", "body.2.*"), torchopt.sgd(lr=0.1), steps=1),
        outer_params=mk.everything(),
        strategy=mk.FirstOrder(),
        cut=declared_cut(),
    )
    data = mk.tasks.SineTasks(seed=0, dtype=torch.float64).sample(1)
    with pytest.raises(mk.CutError, match=r"'body\.2\.(weight|bias)' is used below the cut"):
        learner.meta_step(data)


def test_a_cut_at_a_missing_module_is_refused():
    with pytest.raises(mk.CutError, match=r"no submodule 'neck'"):
        mk.MetaLearner(
            Encoder(),
            sine_loss,
            inner=mk.InnerLoop(mk.select("head.*"), torchopt.sgd(lr=0.1), steps=1),
            outer_params=mk.everything(),
            strategy=mk.FirstOrder(),
            cut=mk.Cut(at="neck", rest=lambda run, features, x: features),
        )
