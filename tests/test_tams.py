"""TAMS (Hou et al., 2022): relaxation, meta-gradients of α vs float64 finite differences, discretize."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchopt
from transformers import BertConfig, BertForTokenClassification, BertModel

import metakit as mk
from metakit import recipes
from metakit.peft import add_lora, add_tams, backbone_spec, head_spec

torch.set_num_threads(1)

LAYERS, HIDDEN, FFN, LABELS, RANK, BOTTLENECK = 2, 16, 32, 3, 2, 4
TINY = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=2,
    intermediate_size=FFN,
    vocab_size=60,
    max_position_embeddings=32,
    num_labels=LABELS,
)
ALL = ("frozen", "tarp", "adapter", "skip")
#: Houlsby candidates start at N(0, 1e-3²) weights, as add_houlsby_adapters; TARP's is exact.
INSERTION_ATOL = 1e-4
MBERT = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=119547
)


def tiny_bert(seed: int = 0, dtype=torch.float32) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(**TINY)).to(dtype).eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (2, 6), generator=gen)
    return {"input_ids": ids, "labels": torch.randint(0, LABELS, (2, 6), generator=gen)}


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=data["input_ids"]).logits


def token_loss(forward, data):
    return forward(**data).loss


def randomize(model, spec, std: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in spec.names(model):
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def alphas(model, controller) -> list[torch.nn.Parameter]:
    return [model.get_parameter(n) for n in controller.arch.names(model)]


# -- relaxation ------------------------------------------------------------------------------------
def test_default_candidates_are_near_identity_at_insertion():
    model, data = tiny_bert(), batch(1)
    before = logits(model, data)
    tams = add_tams(model, rank=RANK, bottleneck=BOTTLENECK)
    assert tams.candidates == ("frozen", "tarp", "adapter")
    assert len(tams.layers) == 2 * LAYERS  # attention output and FFN output of every layer
    assert torch.allclose(logits(model, data), before, atol=INSERTION_ATOL, rtol=0)
    other = tiny_bert()
    add_tams(other, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK)  # a uniform mix with "skip" is not
    assert not torch.allclose(logits(other, data), before, atol=INSERTION_ATOL, rtol=0)


def test_mixture_is_the_softmax_weighted_sum_of_candidates():
    model = tiny_bert(dtype=torch.float64)
    tams = add_tams(model, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK, targets="*.layer.0.output.dense")
    randomize(model, tams.inner | tams.outer, std=0.5)
    layer = model.get_submodule(tams.layers[0])
    x = torch.randn(2, 3, FFN, dtype=torch.float64)
    with torch.no_grad():
        y0 = torch.nn.functional.linear(x, layer.weight, layer.bias)
        outputs = [y0, y0 + layer.tarp.delta(layer.weight, x), layer.adapter(y0), torch.zeros_like(y0)]
        w = torch.softmax(layer.tams_alpha, 0)
        assert torch.allclose(layer(x), sum(wi * o for wi, o in zip(w, outputs, strict=True)), atol=1e-12)


# -- specs and the recipe -------------------------------------------------------------------------------
def test_specs_partition_the_model_and_the_recipe_makes_alpha_outer_only():
    model = tiny_bert()
    tams = add_tams(model, rank=RANK, bottleneck=BOTTLENECK)
    arch, inner, outer = (set(s.names(model)) for s in (tams.arch, tams.inner, tams.outer))
    head, backbone = set(head_spec(model).names(model)), set(backbone_spec(model).names(model))
    everything = {n for n, _ in model.named_parameters()}
    assert arch == {f"{layer}.tams_alpha" for layer in tams.layers} and arch <= outer
    assert not inner & outer and inner | outer | head | backbone == everything
    assert len(inner) + len(outer) + len(head) + len(backbone) == len(everything)
    learner = recipes.tams(model, token_loss, controller=tams, head=head_spec(model))
    assert set(learner.outer_only_names) == outer
    assert set(learner.shared_names) == inner  # their initialisation is meta-learned (meta_learn_init)
    assert set(learner.inner_only_names) == head
    frozen_init = recipes.tams(
        model, token_loss, controller=tams, head=head_spec(model), meta_learn_init=False
    )
    assert set(frozen_init.inner_only_names) == inner | head


def test_inner_loop_changes_only_the_candidates_task_parameters_and_head():
    model = tiny_bert()
    tams = add_tams(model, rank=RANK, bottleneck=BOTTLENECK)
    learner = recipes.tams(model, token_loss, controller=tams, head=head_spec(model), steps=2, inner_lr=0.5)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = learner.adapt(mk.Task(batch(1), batch(2)))
    assert set(adapted) == set((tams.inner | head_spec(model)).names(model))
    assert all(not torch.equal(v, snapshot[n]) for n, v in adapted.items())
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


# -- meta-gradients of the architecture weights vs float64 finite differences ----------------------------
def _fd_setup(strategy):
    model = tiny_bert(seed=3, dtype=torch.float64)
    tams = add_tams(model, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK)
    randomize(model, tams.inner | tams.outer, std=0.3, seed=4)  # away from the symmetric start
    learner = recipes.tams(
        model,
        token_loss,
        controller=tams,
        head=head_spec(model),
        steps=2,
        strategy=strategy,
        optimizer=torchopt.sgd(lr=0.3),
    )
    return model, tams, learner, mk.Task(batch(5), batch(6))


def _query_loss(model, learner, task, adapted=None) -> float:
    adapted = learner.adapt(task) if adapted is None else adapted
    with torch.no_grad():
        return float(token_loss(mk.bind(model, adapted), task.query))


def _central_difference(model, param, index, loss, eps=1e-6) -> float:
    with torch.no_grad():
        param[index] += eps
        up = loss()
        param[index] -= 2 * eps
        down = loss()
        param[index] += eps
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("strategy", [mk.SecondOrder(), mk.FirstOrder()], ids=["second-order", "first-order"])
def test_architecture_weights_get_the_meta_gradient(strategy):
    model, tams, learner, task = _fd_setup(strategy)
    learner.meta_step([task])
    if isinstance(strategy, mk.FirstOrder):
        frozen = learner.adapt(task)  # first order: the adapted parameters are constants
        loss = lambda: _query_loss(model, learner, task, adapted=frozen)  # noqa: E731
    else:
        loss = lambda: _query_loss(model, learner, task)  # noqa: E731 - re-adapts at every α
    checked = 0
    for alpha in alphas(model, tams):
        assert alpha.grad is not None and alpha.grad.abs().sum() > 1e-6
        for k in range(len(ALL)):
            expected = _central_difference(model, alpha, k, loss)
            assert alpha.grad[k].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
            checked += 1
    assert checked == 2 * LAYERS * len(ALL)
    # TARP's generator (outer only) gets its meta-gradient through the same path
    bias = model.get_parameter(f"{tams.layers[0]}.tarp.diag.bias")
    for k in range(2):
        assert bias.grad[k].item() == pytest.approx(
            _central_difference(model, bias, k, loss), rel=1e-5, abs=1e-9
        )


def test_first_and_second_order_differ_on_alpha():
    grads = {}
    for strategy in (mk.SecondOrder(), mk.FirstOrder()):
        model, tams, learner, task = _fd_setup(strategy)
        learner.meta_step([task])
        grads[type(strategy).__name__] = torch.cat([a.grad for a in alphas(model, tams)])
    assert not torch.allclose(grads["SecondOrder"], grads["FirstOrder"], rtol=1e-3, atol=0)


# -- discretize -------------------------------------------------------------------------------------------
def test_discretize_picks_the_argmax_and_drops_the_rest():
    model = tiny_bert()
    tams = add_tams(model, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK)
    wanted = dict(zip(tams.layers, ["tarp", "adapter", "skip", "frozen"], strict=True))
    with torch.no_grad():
        for layer, choice in wanted.items():
            alpha = model.get_parameter(f"{layer}.tams_alpha")
            alpha.copy_(torch.randn(len(ALL)) * 0.1)
            alpha[ALL.index(choice)] = 1.0
    assert tams.choice() == wanted
    assert tams.discretize() == wanted
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("tams_alpha") for n in names) and tams.arch.names(model) == []
    first, second = tams.layers[0], tams.layers[1]
    assert any(n.startswith(f"{first}.tarp.") for n in names) and not any(
        n.startswith(f"{first}.adapter.") for n in names
    )
    assert any(n.startswith(f"{second}.adapter.") for n in names) and not any(
        n.startswith(f"{second}.tarp.") for n in names
    )
    assert not any(
        n.startswith(f"{layer}.") and ("tarp" in n or "adapter" in n)
        for layer in tams.layers[2:]
        for n in names
    )
    assert set(tams.inner.names(model)) == {
        n for n in names if n.startswith((f"{first}.tarp.task", f"{second}.adapter."))
    }
    with pytest.raises(ValueError, match="already fixed"):
        tams.discretize()


def test_discretized_model_equals_the_relaxed_one_when_weights_are_one_hot():
    model, data = tiny_bert(), batch(1)
    tams = add_tams(model, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK)
    randomize(model, tams.inner | tams.outer, std=0.3)
    choices = ["tarp", "adapter", "skip", "frozen"]
    with torch.no_grad():
        for layer, choice in zip(tams.layers, choices, strict=True):
            one_hot = torch.full((len(ALL),), float("-inf"))
            one_hot[ALL.index(choice)] = 0.0
            model.get_parameter(f"{layer}.tams_alpha").copy_(one_hot)
    assert all(
        w == dict.fromkeys(ALL, 0.0) | {c: 1.0} for w, c in zip(tams.weights().values(), choices, strict=True)
    )
    relaxed = logits(model, data)
    tams.discretize()
    assert torch.allclose(logits(model, data), relaxed, atol=1e-6, rtol=0)


def test_discretized_differs_from_a_relaxed_mixture():
    model, data = tiny_bert(), batch(1)
    tams = add_tams(model, candidates=ALL, rank=RANK, bottleneck=BOTTLENECK)
    randomize(model, tams.inner | tams.outer, std=0.3)  # α random too: a genuine mixture
    relaxed = logits(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # α moved since insertion: no "initial choice" warning
        tams.discretize()
    assert not torch.allclose(logits(model, data), relaxed, atol=1e-3, rtol=0)


def test_discretize_before_meta_training_warns_that_the_choice_is_the_initial_one():
    model = tiny_bert()
    tams = add_tams(model, rank=RANK, bottleneck=BOTTLENECK)
    with pytest.warns(UserWarning, match=r"before any meta-training.*initial one.*'frozen'"):
        chosen = tams.discretize()
    assert set(chosen.values()) == {"frozen"}


def test_meta_training_moves_alpha_and_silences_the_warning():
    model = tiny_bert()
    tams = add_tams(model, rank=RANK, bottleneck=BOTTLENECK)
    randomize(model, tams.inner, std=0.1)  # candidates that differ, so α has a gradient
    learner = recipes.tams(model, token_loss, controller=tams, head=head_spec(model), steps=1)
    optimizer = torch.optim.SGD(learner.outer_parameters(), lr=1.0)
    learner.meta_step([mk.Task(batch(1), batch(2))])
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tams.discretize()


# -- parameter counts -----------------------------------------------------------------------------------
def test_parameter_counts_per_layer_for_mbert():
    with torch.device("meta"):
        model = BertModel(BertConfig(**MBERT))
    rank, bottleneck = 8, 64
    tams = add_tams(model, rank=rank, bottleneck=bottleneck)
    params = dict(model.named_parameters())
    h, f = MBERT["hidden_size"], MBERT["intermediate_size"]

    def count(spec, layer):
        return sum(params[n].numel() for n in spec.names(model) if f"encoder.layer.{layer}." in n)

    # attention output [h, h] and FFN output [h, f]: TARP task factors 2·out·r; shared 2·r·in + 2r·(in + 1)
    tarp_inner = 2 * h * rank + 2 * h * rank
    tarp_outer = (2 * rank * h + 2 * rank * (h + 1)) + (2 * rank * f + 2 * rank * (f + 1))
    adapters = 2 * (h * bottleneck + bottleneck + bottleneck * h + h)
    for layer in (0, 11):
        assert count(tams.arch, layer) == 2 * 3
        assert count(tams.tarp.inner, layer) == tarp_inner == 24576
        assert count(tams.tarp.outer, layer) == tarp_outer == 122912
        assert count(tams.adapters, layer) == adapters == 198272


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "candidates, error, message",
    [
        ((), ValueError, "candidates is empty"),
        (
            ["frozen", "lora2"],
            ValueError,
            r"unknown TAMS candidate\(s\) \['lora2'\]; known: \['adapter', 'frozen'",
        ),
        ("tarp", TypeError, "list of candidate names"),
        (["tarp", "tarp"], ValueError, "repeat"),
    ],
)
def test_bad_candidates(candidates, error, message):
    model = tiny_bert()
    with pytest.raises(error, match=message):
        add_tams(model, candidates=candidates)
    assert not any("tams" in n for n, _ in model.named_parameters())


def test_bad_rank_bottleneck_and_targets():
    with pytest.raises(ValueError, match=r"rank 17 is above"):
        add_tams(tiny_bert(), rank=HIDDEN + 1)
    add_tams(tiny_bert(), candidates=("frozen", "adapter"), rank=HIDDEN + 1, bottleneck=2)  # rank unused
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        add_tams(tiny_bert(), bottleneck=0)
    with pytest.raises(ValueError, match=r"TAMS target '\*\.nothing' matches no nn\.Linear"):
        add_tams(tiny_bert(), targets="*.nothing")


def test_layers_with_pe_already_are_refused():
    model = tiny_bert()
    add_lora(model, targets="*.output.dense", rank=RANK)
    with pytest.raises(ValueError, match=r"already has \['lora'\]"):
        add_tams(model)
    fresh = tiny_bert()
    add_tams(fresh)
    with pytest.raises(ValueError, match="TAMS sublayer"):
        add_lora(fresh, targets="*.attention.output.dense")
