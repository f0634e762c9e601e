"""The priming experiment's inner loop runs on the library's feature reuse (metakit.Cut): the same
meta-gradient as running the whole tagger at every inner step, under every strategy."""

import pytest
import torch

import metakit as mk
from metakit import recipes
from metakit.experiments.tagger import Tagger, token_loss
from metakit.experiments.tiny import tiny_bert
from metakit.peft import add_top_adapter, head_spec

pytestmark = pytest.mark.usefixtures("float64")


def tagger():
    model = tiny_bert(vocab_size=40, num_labels=3, hidden=16).to(torch.float64).eval()
    adapter = add_top_adapter(model, bottleneck=4)
    return Tagger(model, adapter), adapter


def tasks():
    generator = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(5, 40, (2, 6), generator=generator)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 3, (2, 6)),
        }

    return [mk.Task(batch(), batch()) for _ in range(2)]


@pytest.mark.parametrize(
    "strategy", [mk.FirstOrder(), mk.SecondOrder(), mk.SecondOrder(hvp="forward")], ids=repr
)
def test_priming_with_the_taggers_cut_equals_the_whole_model(strategy):
    batch = tasks()
    grads = []
    for reuse in (True, False):
        model, adapter = tagger()
        head = head_spec(model)
        cut = model.feature_cut(adapter | head) if reuse else None
        assert (cut is not None) == reuse
        learner = recipes.priming(
            model, token_loss, pe=adapter, head=head, steps=2, strategy=strategy, cut=cut
        )
        learner.meta_step(batch)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12, msg=name)


def test_no_cut_when_the_inner_loop_reaches_the_encoder():
    model, adapter = tagger()
    assert model.feature_cut(adapter | head_spec(model) | mk.select("bert.encoder.layer.1.*")) is None
