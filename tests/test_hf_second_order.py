"""Strategies through a Hugging Face model: SDPA (the default) gives the eager-attention meta-gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torchopt
from transformers import (
    BertConfig,
    BertForTokenClassification,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

import metakit as mk
from metakit import recipes
from metakit.peft import add_top_adapter, backbone_spec, head_spec, peft_params

torch.set_num_threads(1)

LABELS = 4
TINY = dict(
    num_hidden_layers=2,
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    vocab_size=60,
    max_position_embeddings=32,
    num_labels=LABELS,
)


def loss_fn(forward, batch) -> torch.Tensor:
    return forward(**batch).loss


def tasks(n: int = 2, seed: int = 0) -> list[mk.Task]:
    gen = torch.Generator().manual_seed(seed)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(5, TINY["vocab_size"], (3, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # padding: the attention mask must reach both kernels
        labels = torch.randint(0, LABELS, (3, 7), generator=gen).masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return [mk.Task(support=batch(), query=batch()) for _ in range(n)]


def twin_models(dtype: torch.dtype, family: str = "bert") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: one with the default (SDPA) attention, one with eager attention."""
    torch.manual_seed(0)
    if family == "bert":
        sdpa = BertForTokenClassification(BertConfig(**TINY))
    else:
        sdpa = XLMRobertaForTokenClassification(XLMRobertaConfig(**TINY))
    sdpa = sdpa.to(dtype).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    return sdpa, eager


def meta_gradient(model, make_learner) -> dict[str, torch.Tensor]:
    learner = make_learner(model)
    result = learner.meta_step(tasks())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and result.inner_losses.shape == (2, 4)
    return grads


def maml(model, strategy):
    head = head_spec(model)
    return mk.MetaLearner(
        model,
        loss_fn,
        inner=mk.InnerLoop(
            params=head | mk.select("*.attention.self.*"), optimizer=torchopt.sgd(lr=0.3), steps=3
        ),
        outer_params=mk.everything(),
        strategy=strategy,
    )


def priming(model):
    torch.manual_seed(1)  # the same adapter init in both twins
    adapter = add_top_adapter(model, bottleneck=4, init_std=0.1)
    return recipes.priming(model, loss_fn, pe=adapter, head=head_spec(model), inner_lr=0.3, steps=3)


def reptile(model):
    inner = head_spec(model) | mk.select("*.attention.self.*")
    return mk.MetaLearner(
        model,
        loss_fn,
        inner=mk.InnerLoop(params=inner, optimizer=torchopt.sgd(lr=0.3), steps=3),
        outer_params=inner,  # Reptile needs outer ⊆ inner
        strategy=mk.Reptile(),
    )


LEARNERS = {
    "second-order": lambda m: maml(m, mk.SecondOrder()),
    "first-order": lambda m: maml(m, mk.FirstOrder()),
    "truncated": lambda m: maml(m, mk.Truncated(1)),
    "implicit": lambda m: maml(m, mk.Implicit(lam=1.0, cg_steps=3)),
    "reptile": reptile,
    "priming": priming,
}
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(LEARNERS))
def test_sdpa_meta_gradient_equals_eager(kind, dtype):
    sdpa, eager = twin_models(dtype)
    from_sdpa = meta_gradient(sdpa, LEARNERS[kind])
    from_eager = meta_gradient(eager, LEARNERS[kind])
    assert from_sdpa.keys() == from_eager.keys()
    for name, grad in from_sdpa.items():
        torch.testing.assert_close(grad, from_eager[name], **TOLERANCE[dtype], msg=name)


def test_xlm_roberta_second_order_equals_eager():
    sdpa, eager = twin_models(torch.float32, family="xlm-roberta")
    from_sdpa = meta_gradient(sdpa, LEARNERS["second-order"])
    from_eager = meta_gradient(eager, LEARNERS["second-order"])
    for name, grad in from_sdpa.items():
        torch.testing.assert_close(grad, from_eager[name], **TOLERANCE[torch.float32], msg=name)


def test_second_order_differs_from_first_order():
    """The exact meta-gradient really goes through the inner gradients (the comparison above is not vacuous)."""
    first, _ = twin_models(torch.float64)
    second = copy.deepcopy(first)
    a = meta_gradient(first, LEARNERS["first-order"])
    b = meta_gradient(second, LEARNERS["second-order"])
    name = "bert.embeddings.word_embeddings.weight"  # outer only: reached through the adapted attention
    assert (a[name] - b[name]).abs().max() > 1e-6


def test_fused_sdpa_has_no_double_backward_without_metakit():
    """What metakit protects users from: the default kernel cannot be differentiated twice."""
    model, _ = twin_models(torch.float32)
    task = tasks(1)[0]
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    query = params["bert.encoder.layer.0.attention.self.query.weight"]
    loss = mk.bind(model, params)(**task.support).loss
    (grad,) = torch.autograd.grad(loss, query, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grad.square().sum(), query)


def test_peft_wrapped_model_primed_gets_lora_meta_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="TOKEN_CLS", target_modules=["query", "value"], r=2, lora_alpha=4)
    model = peft.get_peft_model(BertForTokenClassification(BertConfig(**TINY)).train(), config)
    lora, head = peft_params(model), head_spec(model)
    # peft freezes the backbone; priming meta-learns it, so unfreeze it the usual PyTorch way.
    for name in backbone_spec(model).names(model):
        model.get_parameter(name).requires_grad_(True)
    learner = recipes.priming(model, loss_fn, pe=lora, head=head, inner_lr=0.3, steps=3)
    head_before = {n: model.get_parameter(n).detach().clone() for n in head.names(model)}
    result = learner.meta_step(tasks())
    assert torch.isfinite(result.loss)
    for name in lora.names(model) + backbone_spec(model).names(model)[-4:]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name in head.names(model):  # not meta-learned: carried over from the first task (Algorithm 1)
        assert model.get_parameter(name).grad is None
        assert not torch.equal(model.get_parameter(name), head_before[name])
