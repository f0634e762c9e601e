"""Mixed precision: bf16 autocast forwards keep the second-order meta-gradient close to float32's.

``MetaLearner`` takes no ``precision=`` yet, so these tests route the learner's task problems
through :func:`precision_objective`, as ``MetaLearner(precision=...)`` does (``TaskProblem.objective``).
"""

from __future__ import annotations

import pytest
import torch
import torchopt

import metakit as mk
from metakit.precision import (
    DEFAULT_FP16_LOSS_SCALE,
    autocast_dtype,
    loss_scale_for,
    precision_objective,
    scaled_grad,
)
from metakit.tasks import SineTasks, mse_loss, sine_mlp

torch.set_num_threads(1)

TINY_BERT = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=80,
    max_position_embeddings=32,
    num_labels=5,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
#: Stated tolerance: bf16 keeps 8 bits of mantissa; through 2 second-order inner steps on this tiny
#: BERT the meta-gradient keeps a cosine above 0.999 and a relative error below 5% to float32's
#: (measured: cosine 0.99999, relative error 0.4%, with 1 and 2 threads).
BF16_MIN_COSINE = 0.999
BF16_MAX_RELATIVE_ERROR = 0.05


def bert_tasks(n: int) -> list[mk.Task]:
    gen = torch.Generator().manual_seed(2)

    def batch():
        ids = torch.randint(5, TINY_BERT["vocab_size"], (4, 8), generator=gen)
        labels = torch.randint(0, TINY_BERT["num_labels"], (4, 8), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return [mk.Task(support=batch(), query=batch()) for _ in range(n)]


def bert_learner(precision: str = "fp32") -> mk.MetaLearner:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(**TINY_BERT)).eval()
    return mk.MetaLearner(
        model,
        lambda forward, batch: forward(**batch).loss,
        inner=mk.InnerLoop(mk.select("classifier.*", "*.attention.self.*"), torchopt.sgd(lr=0.3), steps=2),
        outer_params=mk.everything(),
        strategy=mk.SecondOrder(),
        precision=precision,
    )


def bert_meta_gradient(precision: str) -> torch.Tensor:
    learner = bert_learner(precision)
    model = learner.model
    result = learner.meta_step(bert_tasks(2))
    assert torch.isfinite(result.loss) and result.loss.dtype == torch.float32
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    return torch.cat([g.reshape(-1) for g in grads])


def test_bf16_second_order_meta_gradient_is_close_to_float32():
    exact, low = bert_meta_gradient("fp32"), bert_meta_gradient("bf16")
    cosine = torch.nn.functional.cosine_similarity(exact.double(), low.double(), dim=0)
    relative = torch.linalg.vector_norm(low - exact) / torch.linalg.vector_norm(exact)
    assert cosine > BF16_MIN_COSINE, (float(cosine), float(relative))
    assert relative < BF16_MAX_RELATIVE_ERROR
    assert not torch.equal(exact, low)  # bf16 really ran


def maml_meta_gradient(loss_scale: float | None) -> list[torch.Tensor]:
    """Hand-written two-step second-order MAML on a sine MLP, inner gradients by ``scaled_grad``."""
    torch.manual_seed(0)
    model = sine_mlp(hidden=8).double()
    theta = dict(model.named_parameters())
    task = SineTasks(seed=1, dtype=torch.float64).sample(1)[0]
    phi = theta
    for _ in range(2):
        support_loss = mse_loss(mk.bind(model, phi), task.support)
        grads = scaled_grad(support_loss, list(phi.values()), loss_scale, create_graph=True)
        phi = {name: value - 0.05 * g for (name, value), g in zip(phi.items(), grads, strict=True)}
    query_loss = mse_loss(mk.bind(model, phi), task.query)
    return list(scaled_grad(query_loss, list(theta.values()), loss_scale))


def test_loss_scaled_gradients_give_the_same_second_order_meta_gradient():
    # fp16 itself needs a GPU; the scaling it uses is checked here in float64.
    plain, scaled = maml_meta_gradient(None), maml_meta_gradient(2.0**12)
    assert sum(float(g.abs().sum()) for g in plain) > 0
    for want, got in zip(plain, scaled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "strategy",
    [
        mk.SecondOrder(),
        mk.SecondOrder(hvp="forward"),
        mk.SecondOrder(checkpoint=2),
        mk.FirstOrder(),
        mk.Truncated(1),
    ],
    ids=repr,
)
def test_every_strategy_that_declares_loss_scaling_applies_and_removes_it(strategy, monkeypatch):
    # fp16 needs a GPU; here the loss scale fp16 would use is forced onto float64, where scaling by a
    # power of two is exact: a scale applied but not removed (or removed twice) changes the result.
    assert strategy.capabilities.loss_scaling

    def meta_gradient():
        torch.manual_seed(0)
        model = sine_mlp(hidden=8).double()
        learner = mk.MetaLearner(
            model,
            mse_loss,
            inner=mk.InnerLoop(mk.select("2.*", "4.*"), torchopt.sgd(lr=0.05), steps=3, learn_lr=True)
            if strategy.capabilities.learned_lr
            else mk.InnerLoop(mk.select("2.*", "4.*"), torchopt.sgd(lr=0.05), steps=3),
            outer_params=mk.everything(),
            strategy=strategy,
        )
        learner.meta_step(SineTasks(seed=1, dtype=torch.float64).sample(2))
        return [p.grad.clone() for p in learner.outer_parameters()]

    plain = meta_gradient()
    monkeypatch.setattr("metakit.problem.loss_scale_for", lambda precision: 2.0**12)
    scaled = meta_gradient()
    for want, got in zip(plain, scaled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_scaled_grad_is_differentiable_again():
    x = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    (dy,) = scaled_grad(x**3, [x], 2.0**10, create_graph=True)
    assert float(dy.detach()) == 27.0  # 3x²
    (d2y,) = torch.autograd.grad(dy, x)
    assert float(d2y) == 18.0  # 6x
    with pytest.raises(ValueError, match="loss_scale must be a positive"):
        scaled_grad(x**3, [x], 0)


def test_fp32_is_the_objective_itself_and_bad_precisions_are_refused():
    def objective(params, batch):
        return params["w"].sum()

    assert precision_objective(objective, "fp32", "cpu") is objective
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert loss_scale_for("fp16") == DEFAULT_FP16_LOSS_SCALE and loss_scale_for("bf16") is None
    with pytest.raises(ValueError, match=r"fp16.*needs a CUDA device.*bf16"):
        precision_objective(objective, "fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("half", "cpu")


def test_fp16_on_cpu_is_refused_by_the_learner():
    with pytest.raises(ValueError, match=r"fp16.*CUDA.*bf16"):
        bert_learner("fp16")
