"""The prototype head: class means at initialisation, and Proto-MAML meta-gradients through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import metakit as mk
from metakit.prototype import (
    PrototypeBatch,
    PrototypeClassifier,
    PrototypeHead,
    class_prototypes,
    mean_pool,
    prototype_loss,
    prototype_task,
)


def _episode(seed: int = 0, n: int = 3, k: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n).repeat_interleave(k)
    x = torch.randn(n * k, dim, generator=g, dtype=torch.float64) + labels[:, None].double()
    return x, labels


def test_class_prototypes_are_the_class_means():
    x, labels = _episode()
    prototypes = class_prototypes(x, labels, 3)
    for c in range(3):
        torch.testing.assert_close(prototypes[c], x[labels == c].mean(0))
    with pytest.raises(ValueError, match=r"Classes \[3\] have no support example"):
        class_prototypes(x, labels, 4)
    with pytest.raises(ValueError, match=r"Labels must lie in 0\.\.1"):
        class_prototypes(x, labels, 2)


@pytest.mark.parametrize("init", ["euclidean", "mean"])
def test_head_equals_the_class_means_at_init(init):
    x, labels = _episode()
    head = PrototypeHead(5, max_classes=8, init=init).double()
    means = torch.stack([x[labels == c].mean(0) for c in range(3)])
    weight, bias = head.effective(class_prototypes(x, labels, 3))
    if init == "euclidean":  # W = 2·means, b = −‖means‖²: logits are −‖h − p‖² + ‖h‖²
        torch.testing.assert_close(weight, 2 * means)
        torch.testing.assert_close(bias, -(means**2).sum(1))
        h = torch.randn(7, 5, dtype=torch.float64)
        logits = head(h, class_prototypes(x, labels, 3))
        distance = torch.cdist(h, means) ** 2
        torch.testing.assert_close(logits, -distance + (h**2).sum(1, keepdim=True))
    else:
        torch.testing.assert_close(weight, means)
        torch.testing.assert_close(bias, torch.zeros(3, dtype=torch.float64))


def test_head_refuses_more_classes_than_built_for():
    head = PrototypeHead(5, max_classes=2)
    with pytest.raises(ValueError, match="3 classes but the PrototypeHead was built for at most 2"):
        head(torch.zeros(1, 5), torch.zeros(3, 5))


def test_mean_pool_ignores_padding():
    hidden = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), hidden[:, :2].mean(1))


class _Encoder(nn.Module):
    """A tiny float64 encoder: tanh(x A) B."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6, bias=False).double()
        self.b = nn.Linear(6, 4).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _reference_meta_grad(model, support, query, lr, steps, through_prototypes=True):
    """Proto-MAML by hand: prototypes from the start weights, SGD on encoder.b + head, query loss."""
    names = ["encoder.b.weight", "encoder.b.bias", "head.weight", "head.bias"]
    params = dict(model.named_parameters())
    start = {n: params[n] for n in names}

    def run(p, x, prototypes):
        h = torch.func.functional_call(model, {**params, **p}, (), {"x": x})
        return model.head.__class__.forward(_HeadView(p), h, prototypes)

    (xs, ys), (xq, yq) = support, query
    h0 = torch.func.functional_call(model, {**params, **start}, (), {"x": xs})
    prototypes = class_prototypes(h0, ys, 3)
    if not through_prototypes:
        prototypes = prototypes.detach()
    current = dict(start)
    for _ in range(steps):
        loss = F.cross_entropy(run(current, xs, prototypes), ys)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
        current = {n: v - lr * g for (n, v), g in zip(current.items(), grads, strict=True)}
    query_loss = F.cross_entropy(run(current, xq, prototypes), yq)
    outer = ["encoder.b.weight", "encoder.b.bias"]
    return dict(zip(outer, torch.autograd.grad(query_loss, [params[n] for n in outer]), strict=True))


class _HeadView:
    """The head's forward on a params dict (its offset tensors), for the hand-written reference."""

    init = "euclidean"
    max_classes = 8

    def __init__(self, p):
        self.weight, self.bias = p["head.weight"], p["head.bias"]

    def effective(self, prototypes):
        return PrototypeHead.effective(self, prototypes)

    def start(self, prototypes):
        return PrototypeHead.start(self, prototypes)


def test_meta_gradient_flows_through_the_prototypes():
    torch.manual_seed(0)
    model = PrototypeClassifier(_Encoder(), hidden_size=4, max_classes=8).double()
    xs, ys = _episode(seed=1)
    xq, yq = _episode(seed=2)
    learner = mk.MetaLearner(
        model,
        prototype_loss,
        inner=mk.InnerLoop(mk.select("encoder.b.*", "head.*"), torchopt.sgd(lr=0.1), steps=2),
        outer_params=mk.select("encoder.b.*"),
        strategy=mk.SecondOrder(),
    )
    learner.meta_step([prototype_task({"x": xs}, ys, {"x": xq}, yq)])
    expected = _reference_meta_grad(model, (xs, ys), (xq, yq), lr=0.1, steps=2)
    without = _reference_meta_grad(model, (xs, ys), (xq, yq), lr=0.1, steps=2, through_prototypes=False)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12)
            # the prototype path carries a real part of the meta-gradient
            assert (expected[name] - without[name]).norm() > 1e-3 * expected[name].norm()
        else:
            assert param.grad is None
    assert model.head.weight.abs().max() == 0  # the head offset is inner only: every episode starts at 0


def test_query_shares_the_support_prototypes():
    model = PrototypeClassifier(_Encoder(), hidden_size=4, max_classes=8).double()
    xs, ys = _episode(seed=1)
    task = prototype_task({"x": xs}, ys, {"x": xs[:2]}, ys[:2])
    forward = mk.bind(model, dict(model.named_parameters()))
    prototype_loss(forward, task.query)  # the query asks first: prototypes still come from the support
    with torch.no_grad():
        torch.testing.assert_close(task.support.prototypes, class_prototypes(model(x=xs), ys, 3))
    assert task.query.prototypes is None
    task.query.reset()
    assert task.support.prototypes is None
    assert isinstance(task.support, PrototypeBatch) and task.query.support is task.support
