"""TARP (Hou et al., 2022): identity at insertion, Eqs. 2-3 against a hand-built W(x), specs, counts, errors."""

from __future__ import annotations

import pytest
import torch
import torchopt
from transformers import BertConfig, BertForTokenClassification, BertModel

import metakit as mk
from metakit.peft import add_lora, add_tarp, backbone_spec, head_spec
from metakit.peft.tarp import tarp_parameter_count

torch.set_num_threads(1)

LAYERS, HIDDEN, FFN, LABELS, RANK = 2, 32, 64, 5, 4
TINY = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=2,
    intermediate_size=FFN,
    vocab_size=100,
    max_position_embeddings=64,
    num_labels=LABELS,
)
#: TARP's task factors start at zero, so the output at insertion is the pretrained one up to rounding.
INSERTION_ATOL = 1e-6
#: multilingual-e5-small (metakit.experiments.pretrained builds it; its config.json has these numbers).
E5_SMALL = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536, vocab_size=250037
)
#: bert-base-multilingual-cased, written by hand.
MBERT = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=119547
)


def tiny_bert(seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(**TINY)).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, LABELS, (3, 9), generator=gen),
    }


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def randomize(model, spec, std: float = 0.3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in spec.names(model):
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def token_loss(forward, data):
    return forward(**data).loss


# -- identity at insertion ------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [("*.query", "*.value"), ("*.query", "*.key", "*.value", "*.dense")])
def test_output_at_insertion_equals_the_model(targets):
    model, data = tiny_bert(), batch()
    before = logits(model, data)
    tarp = add_tarp(model, rank=RANK, targets=targets)
    assert torch.allclose(logits(model, data), before, atol=INSERTION_ATOL, rtol=0)
    randomize(model, tarp.inner)  # the tolerance is not vacuous: moved task factors move the output
    assert (logits(model, data) - before).abs().max() > 1e-2


# -- Eqs. 2-3 against an explicitly built per-token weight ------------------------------------------
def test_layer_matches_an_explicit_dynamic_weight_in_float64():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5).double()
    holder = torch.nn.Sequential(linear)
    tarp = add_tarp(holder, rank=3, targets="0")
    randomize(holder, tarp.all, std=0.5)
    layer = holder[0]
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    factors = layer.tarp
    W0, b = layer.weight, layer.bias
    expected = torch.empty(2, 4, 5, dtype=torch.float64)
    for i in range(2):
        for t in range(4):
            token = x[i, t]
            sigma = 1 + torch.tanh(factors.diag.weight @ token + factors.diag.bias)
            r1 = (
                torch.ones_like(W0) + factors.task_mul @ torch.diag(sigma[:3]) @ factors.shared_mul
            )  # J + U¹Σ¹V¹ᵀ
            r2 = factors.task_add @ torch.diag(sigma[3:]) @ factors.shared_add  # U²Σ²V²ᵀ
            expected[i, t] = (W0 * r1 + r2) @ token + b  # W(x) = W⁰ ⊙ R¹(x) + R²(x)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)
        # input-dependent: the same layer is a different linear map for two tokens
        one, two = x[0, 0], x[0, 1]
        assert not torch.allclose(
            layer(one + two) - layer(torch.zeros(6, dtype=torch.float64)),
            layer(one) + layer(two) - 2 * layer(torch.zeros(6, dtype=torch.float64)),
        )


# -- specs: inner / outer as the paper assigns them ---------------------------------------------------
def test_specs_split_task_factors_from_shared_ones():
    model = tiny_bert()
    tarp = add_tarp(model, rank=RANK)
    assert repr(tarp.inner) == "select('*.tarp.task_mul', '*.tarp.task_add')"
    inner, outer = set(tarp.inner.names(model)), set(tarp.outer.names(model))
    assert not inner & outer and set(tarp.all.names(model)) == inner | outer
    layer = "bert.encoder.layer.0.attention.self.query"
    assert {f"{layer}.tarp.task_mul", f"{layer}.tarp.task_add"} <= inner
    assert {f"{layer}.tarp.{t}" for t in ("shared_mul", "shared_add", "diag.weight", "diag.bias")} <= outer
    assert len(inner) == 2 * 2 * LAYERS and len(outer) == 4 * 2 * LAYERS
    everything = {n for n, _ in model.named_parameters()}
    groups = [inner | outer, set(head_spec(model).names(model)), set(backbone_spec(model).names(model))]
    assert set.union(*groups) == everything and sum(map(len, groups)) == len(everything)
    assert model.get_parameter(f"{layer}.weight") is model.bert.encoder.layer[0].attention.self.query.weight


def test_inner_loop_changes_only_task_factors_and_head():
    model = tiny_bert()
    tarp = add_tarp(model, rank=RANK)
    head = head_spec(model)
    learner = mk.MetaLearner(
        model,
        token_loss,
        inner=mk.InnerLoop(tarp.inner | head, torchopt.sgd(lr=0.5), steps=2),
        outer_params=tarp.outer | tarp.inner,
        strategy=mk.FirstOrder(),
    )
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = learner.adapt(mk.Task(batch(1), batch(2)))
    assert set(adapted) == set((tarp.inner | head).names(model))
    moved = {n for n, value in adapted.items() if not torch.equal(value, snapshot[n])}
    assert moved == set(adapted)  # every task factor (zero at insertion) and the head moved
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())  # adapt mutates nothing

    result = learner.meta_step([mk.Task(batch(1), batch(2)), mk.Task(batch(3), batch(4))])
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set((tarp.outer | tarp.inner).names(model))
    shared = [model.get_parameter(n).grad for n in tarp.outer.names(model)]
    assert all(torch.isfinite(g).all() for g in shared) and sum(g.abs().sum() for g in shared) > 0
    assert torch.isfinite(result.loss)


# -- parameter counts per layer ---------------------------------------------------------------------
def per_layer_counts(model, spec, layers: int) -> list[int]:
    params = dict(model.named_parameters())
    names = spec.names(model)
    return [sum(params[n].numel() for n in names if f"encoder.layer.{i}." in n) for i in range(layers)]


@pytest.mark.parametrize(
    "config", [E5_SMALL, MBERT], ids=["multilingual-e5-small", "bert-base-multilingual-cased"]
)
@pytest.mark.parametrize("rank", [4, 8])
def test_parameter_counts_per_layer(config, rank):
    with torch.device("meta"):  # shapes only: no memory for the 100M+ weights
        model = BertModel(BertConfig(**config))
    tarp = add_tarp(model, rank=rank, targets=("*.query", "*.value"))
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    # per target [h, h]: inner U¹, U² = 2·h·r; outer V¹, V² = 2·r·h and generator G [2r, h], c [2r]
    inner, outer = 2 * (2 * h * rank), 2 * (2 * rank * h + 2 * rank * h + 2 * rank)
    assert per_layer_counts(model, tarp.inner, layers) == [inner] * layers
    assert per_layer_counts(model, tarp.outer, layers) == [outer] * layers
    assert tarp_parameter_count(h, h, rank) == {"inner": inner // 2, "outer": outer // 2}
    if config is MBERT and rank == 8:  # the numbers the report quotes
        assert (inner, outer) == (24576, 49184)


def test_e5_config_numbers_match_the_built_model_when_cached():
    from metakit.experiments.pretrained import cache_root

    path = cache_root() / "multilingual-e5-small" / "config.json"
    if not path.is_file():
        pytest.skip(
            "multilingual-e5-small has not been built on this machine (metakit.experiments.pretrained)"
        )
    import json

    config = json.loads(path.read_text())
    assert {k: config[k] for k in E5_SMALL} == E5_SMALL


def test_ffn_layers_have_rectangular_factors():
    model = tiny_bert()
    tarp = add_tarp(model, rank=RANK, targets="*.intermediate.dense")
    params = dict(model.named_parameters())
    factors = "bert.encoder.layer.0.intermediate.dense.tarp"
    assert params[f"{factors}.task_mul"].shape == (FFN, RANK)
    assert params[f"{factors}.shared_mul"].shape == (RANK, HIDDEN)
    assert params[f"{factors}.diag.weight"].shape == (2 * RANK, HIDDEN)
    assert len(tarp.inner.names(model)) == 2 * LAYERS


# -- composition and bad input ------------------------------------------------------------------------
def test_tarp_and_lora_on_one_layer_add_up():
    model, data = tiny_bert(), batch()
    lora = add_lora(model, targets="*.query", rank=RANK)
    tarp = add_tarp(model, rank=RANK, targets="*.query")
    randomize(model, lora | tarp.all)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.pe_stack == ("lora", "tarp")
    x = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        lora_part = x @ layer.lora_A.T @ layer.lora_B.T * layer.lora_scale
        assert torch.allclose(layer(x), base + lora_part + layer.tarp.delta(layer.weight, x), atol=1e-6)
    assert logits(model, data).isfinite().all()


def test_target_matching_no_linear_names_it_and_lists_real_ones():
    model = tiny_bert()
    with pytest.raises(
        ValueError, match=r"TARP target '\*\.querry' matches no nn\.Linear.*bert\.encoder\.layer\.0"
    ):
        add_tarp(model, targets=["*.query", "*.querry"])
    with pytest.raises(ValueError, match=r"'\*\.LayerNorm' matches no nn\.Linear"):
        add_tarp(model, targets="*.LayerNorm")
    assert not any(".tarp." in n for n, _ in model.named_parameters())  # nothing half-inserted


@pytest.mark.parametrize("rank", [0, -2, 2.5, True])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        add_tarp(tiny_bert(), rank=rank)


def test_rank_above_the_matrix_dimensions_names_the_layer():
    model = tiny_bert()
    with pytest.raises(
        ValueError,
        match=r"rank 33 is above.*attention\.self\.query with weight \[32, 32\].*min\(out, in\) = 32",
    ):
        add_tarp(model, rank=HIDDEN + 1)
    add_tarp(model, rank=HIDDEN)  # the full rank is allowed
    with pytest.raises(ValueError, match="already has TARP"):
        add_tarp(model, rank=RANK)


def test_bad_targets_type():
    with pytest.raises(TypeError, match="targets must be a glob string"):
        add_tarp(tiny_bert(), targets=[])
