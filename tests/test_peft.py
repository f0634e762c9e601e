"""metakit.peft: insertion counts, identity at insertion, what fine-tuning touches, errors, interop, IO."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForTokenClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaForTokenClassification,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

import metakit as mk
from metakit.peft import (
    PEKind,
    add_houlsby_adapters,
    add_lora,
    add_top_adapter,
    backbone_spec,
    find_layout,
    head_spec,
    load_pe,
    pe_globs,
    pe_kinds,
    pe_spec,
    peft_params,
    save_pe,
)

torch.set_num_threads(1)

LAYERS, HIDDEN, FFN, LABELS, BOTTLENECK, RANK = 2, 32, 64, 5, 8, 4
TINY = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=2,
    intermediate_size=FFN,
    vocab_size=100,
    max_position_embeddings=64,
    num_labels=LABELS,
)
#: Adapters start at N(0, 1e-3²) weights; their effect on the tiny model's logits is ~1e-7.
ADAPTER_ATOL = 1e-4


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


def per_layer(names: list[str], layer: int) -> list[str]:
    return [n for n in names if f".layer.{layer}." in n]


# -- counts and placement ------------------------------------------------------------------------
def test_houlsby_adds_two_adapters_of_four_tensors_per_layer():
    model = tiny_bert()
    before = dict(model.named_parameters())
    spec = add_houlsby_adapters(model, bottleneck=BOTTLENECK)
    names = spec.names(model)
    assert repr(spec) == "select('*.adapter.*')"
    for layer in range(LAYERS):
        assert len(per_layer(names, layer)) == 8
        assert f"bert.encoder.layer.{layer}.attention.output.dense.adapter.down.weight" in names
        assert f"bert.encoder.layer.{layer}.output.dense.adapter.up.bias" in names
    after = dict(model.named_parameters())
    assert set(after) - set(before) == set(names)
    assert all(after[n] is p for n, p in before.items())  # originals keep their names and tensors
    shapes = {n.rsplit(".adapter.", 1)[1]: tuple(after[n].shape) for n in names}
    assert shapes == {
        "down.weight": (BOTTLENECK, HIDDEN),
        "down.bias": (BOTTLENECK,),
        "up.weight": (HIDDEN, BOTTLENECK),
        "up.bias": (HIDDEN,),
    }


@pytest.mark.parametrize(
    "factory", [tiny_bert, lambda: BertModel(BertConfig(**TINY))], ids=["token-cls", "bare"]
)
def test_top_adapter_adds_four_tensors_after_the_last_layer(factory):
    model = factory()
    prefix = "bert." if isinstance(model, BertForTokenClassification) else ""
    spec = add_top_adapter(model, bottleneck=BOTTLENECK)
    names = spec.names(model)
    assert repr(spec) == "select('*.top_adapter.*')"
    assert names == [
        f"{prefix}encoder.layer.{LAYERS - 1}.output.LayerNorm.top_adapter.{p}"
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    ]
    assert all(len(per_layer(names, layer)) == 0 for layer in range(LAYERS - 1))


def test_top_adapter_changes_what_the_head_sees():
    model = tiny_bert()
    spec = add_top_adapter(model, bottleneck=BOTTLENECK)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = batch()
    base = mk.bind(model, params)(input_ids=data["input_ids"]).logits
    for name in spec.names(model):
        params[name] = torch.randn_like(params[name])
    moved = mk.bind(model, params)(input_ids=data["input_ids"]).logits
    assert (moved - base).abs().max() > 1e-2


def test_lora_adds_two_tensors_per_targeted_linear():
    model = tiny_bert()
    spec = add_lora(model, targets=["*.query", "*.value"], rank=RANK)
    names = spec.names(model)
    assert repr(spec) == "select('*.lora_A', '*.lora_B')"
    for layer in range(LAYERS):
        assert sorted(per_layer(names, layer)) == sorted(
            f"bert.encoder.layer.{layer}.attention.self.{m}.lora_{f}"
            for m in ("query", "value")
            for f in "AB"
        )
    params = dict(model.named_parameters())
    assert params["bert.encoder.layer.0.attention.self.query.lora_A"].shape == (RANK, HIDDEN)
    assert params["bert.encoder.layer.0.attention.self.query.lora_B"].shape == (HIDDEN, RANK)


@pytest.mark.parametrize(
    "config_cls, model_cls",
    [(XLMRobertaConfig, XLMRobertaForTokenClassification), (RobertaConfig, RobertaForTokenClassification)],
)
def test_roberta_family_layouts(config_cls, model_cls):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY)).eval()
    layout = find_layout(model)
    assert layout.backbone == "roberta" and layout.task_model == ""
    assert len(add_houlsby_adapters(model, bottleneck=BOTTLENECK).names(model)) == 8 * LAYERS
    assert len(add_top_adapter(model, bottleneck=BOTTLENECK).names(model)) == 4
    assert head_spec(model).names(model) == ["classifier.weight", "classifier.bias"]


def test_head_backbone_and_pe_partition_the_model():
    model = tiny_bert()
    pe = (
        add_houlsby_adapters(model, BOTTLENECK)
        | add_top_adapter(model, BOTTLENECK)
        | add_lora(model, rank=RANK)
    )
    groups = [set(s.names(model)) for s in (pe, head_spec(model), backbone_spec(model))]
    everything = {n for n, _ in model.named_parameters()}
    assert set.union(*groups) == everything
    assert sum(len(g) for g in groups) == len(everything)  # disjoint
    assert groups[1] == {"classifier.weight", "classifier.bias"}


# -- identity at insertion --------------------------------------------------------------------------
def test_lora_leaves_the_output_exactly_unchanged():
    model, data = tiny_bert(), batch()
    before = logits(model, data)
    add_lora(model, targets=["*.query", "*.key", "*.value", "*.dense"], rank=RANK)
    assert torch.equal(logits(model, data), before)


@pytest.mark.parametrize("insert", [add_houlsby_adapters, add_top_adapter], ids=["houlsby", "top"])
def test_adapters_are_near_identity_at_insertion(insert):
    model, data = tiny_bert(), batch()
    before = logits(model, data)
    insert(model, bottleneck=BOTTLENECK)
    assert torch.allclose(logits(model, data), before, atol=ADAPTER_ATOL, rtol=0)


def test_adapter_tolerance_is_not_vacuous():
    model, data = tiny_bert(), batch()
    before = logits(model, data)
    add_houlsby_adapters(model, bottleneck=BOTTLENECK, init_std=0.5)
    assert not torch.allclose(logits(model, data), before, atol=ADAPTER_ATOL, rtol=0)


# -- only PE + head change when fine-tuned ----------------------------------------------------------
INSERTIONS = {
    "houlsby": lambda m: add_houlsby_adapters(m, bottleneck=BOTTLENECK),
    "top": lambda m: add_top_adapter(m, bottleneck=BOTTLENECK),
    "lora": lambda m: add_lora(m, rank=RANK),
}


@pytest.mark.parametrize("kind", list(INSERTIONS))
def test_fine_tuning_the_spec_changes_only_pe_and_head(kind):
    model = tiny_bert().train()
    tuned_spec = INSERTIONS[kind](model) | head_spec(model)
    tuned = tuned_spec.names(model)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD([params[n] for n in tuned], lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        model(**batch(seed=step)).loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed == set(tuned)


def test_pe_params_get_gradients_through_bind():
    model = tiny_bert()
    spec = add_houlsby_adapters(model, BOTTLENECK) | add_top_adapter(model, BOTTLENECK) | head_spec(model)
    selected, _ = spec.split(dict(model.named_parameters()))
    params = {n: p.detach().clone().requires_grad_() for n, p in selected.items()}
    loss = mk.bind(model, params)(**batch()).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bottleneck", [0, -4, 2.5, True])
@pytest.mark.parametrize("insert", [add_houlsby_adapters, add_top_adapter])
def test_bad_bottleneck(insert, bottleneck):
    model = tiny_bert()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        insert(model, bottleneck=bottleneck)
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("insert", [add_houlsby_adapters, add_top_adapter, head_spec])
def test_unknown_architecture_names_what_it_looked_for(insert):
    model = DistilBertModel(DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=32, vocab_size=50))
    with pytest.raises(
        ValueError, match=r"DistilBertModel.*encoder\.layer.*attention\.output\.dense.*transformer\.layer"
    ):
        insert(model)


def test_lora_target_matching_no_linear():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"'\*\.querry' matches no nn\.Linear.*bert\.encoder"):
        add_lora(model, targets=["*.query", "*.querry"])
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing half-inserted
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        add_lora(model, targets="*.LayerNorm")  # matches modules, but none is a Linear


@pytest.mark.parametrize(
    "kwargs, message", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"targets": []}, "targets")]
)
def test_lora_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        add_lora(tiny_bert(), **kwargs)


def test_inserting_twice_is_refused():
    model = tiny_bert()
    add_houlsby_adapters(model, BOTTLENECK)
    add_top_adapter(model, BOTTLENECK)
    add_lora(model, rank=RANK)
    with pytest.raises(ValueError, match="already has a Houlsby adapter"):
        add_houlsby_adapters(model, BOTTLENECK)
    with pytest.raises(ValueError, match="already has a top adapter"):
        add_top_adapter(model, BOTTLENECK)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, rank=RANK)


def test_bare_encoder_has_no_head():
    with pytest.raises(ValueError, match="bare encoder with no task head"):
        head_spec(BertModel(BertConfig(**TINY)))


# -- interop with the peft library -----------------------------------------------------------------
def peft_wrapped():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type="TOKEN_CLS", target_modules=["query", "value"], r=RANK, lora_alpha=8)
    return peft.get_peft_model(tiny_bert(), config)


def test_peft_params_select_exactly_the_lora_tensors():
    model = peft_wrapped()
    spec = peft_params(model)
    names = spec.names(model)
    assert repr(spec) == "select('*.lora_A.default.*', '*.lora_B.default.*')"
    assert len(names) == LAYERS * 2 * 2
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert head_spec(model).names(model) == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    assert not set(backbone_spec(model).names(model)) & set(names)


def test_peft_model_runs_through_bind_and_functional_call():
    model = peft_wrapped().eval()
    data = batch()
    lora = peft_params(model)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(**data).logits
    out = mk.bind(model, params)(**data)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    lora_b = [n for n in lora.names(model) if ".lora_B." in n]  # lora_A's gradient is 0 while B = 0
    grads = torch.autograd.grad(out.loss, [params[n] for n in lora_b])
    assert len(grads) == LAYERS * 2 and all(g.abs().sum() > 0 for g in grads)
    # a params dict of only the LoRA tensors, straight through torch.func.functional_call
    moved = {n: torch.randn_like(p) for n, p in lora.split(params)[0].items()}
    direct = functional_call(model, moved, (), {"input_ids": data["input_ids"]}, strict=False).logits
    assert not torch.allclose(direct, expected, atol=1e-3)


def test_top_adapter_inside_a_peft_model():
    model = peft_wrapped()
    spec = add_top_adapter(model, bottleneck=BOTTLENECK)
    assert len(spec.names(model)) == 4
    assert all(n.startswith("base_model.model.bert.encoder.layer.1.") for n in spec.names(model))


def test_peft_params_on_a_plain_model():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="get_peft_model"):
        peft_params(tiny_bert())


def test_peft_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'peft>=0\.11'"):
        peft_params(tiny_bert())


# -- save / load ------------------------------------------------------------------------------------
def test_save_and_load_pe_round_trip(tmp_path):
    source = tiny_bert(seed=0)
    spec = add_houlsby_adapters(source, BOTTLENECK) | add_lora(source, rank=RANK) | head_spec(source)
    with torch.no_grad():
        for name in spec.names(source):
            source.get_parameter(name).normal_()
    path = tmp_path / "task.safetensors"
    saved = save_pe(path, source, spec)
    assert saved == spec.names(source)

    target = tiny_bert(seed=0)  # same backbone, fresh PE modules and head
    add_houlsby_adapters(target, BOTTLENECK)
    add_lora(target, rank=RANK)
    data = batch()
    assert not torch.allclose(logits(target, data), logits(source, data))
    assert load_pe(path, target) == sorted(saved)
    assert torch.equal(logits(target, data), logits(source, data))


def test_save_pe_writes_given_params(tmp_path):
    model = tiny_bert()
    head = head_spec(model)
    adapted = {"classifier.bias": torch.full((LABELS,), 7.0)}
    save_pe(tmp_path / "head.safetensors", model, head, params=adapted)
    load_pe(tmp_path / "head.safetensors", model)
    assert torch.equal(model.classifier.bias, adapted["classifier.bias"])


def test_load_pe_into_a_model_without_the_modules(tmp_path):
    source = tiny_bert()
    save_pe(tmp_path / "a.safetensors", source, add_top_adapter(source, BOTTLENECK))
    with pytest.raises(ValueError, match="Insert the same PE modules"):
        load_pe(tmp_path / "a.safetensors", tiny_bert())
    other = tiny_bert()
    add_top_adapter(other, bottleneck=BOTTLENECK * 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pe(tmp_path / "a.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pe(tmp_path / "bad.safetensors", other)


# -- PE kinds declare their own parameter names ------------------------------------------------------
def test_specs_come_from_the_kinds_declarations():
    kinds = pe_kinds()
    assert {"lora", "houlsby", "top_adapter", "tarp", "tams", "peft_lora"} <= set(kinds)
    assert kinds["lora"].param_names == ("lora_A", "lora_B")
    assert kinds["houlsby"].param_names == ("adapter",)
    globs = set(pe_globs())
    assert all(set(kind.globs()) <= globs for kind in kinds.values())
    assert repr(pe_spec()) == f"select({', '.join(repr(g) for g in pe_globs())})"


def test_pe_globs_alias_is_deprecated_and_derived():
    from metakit.peft import layout

    old = {"*.adapter.*", "*.top_adapter.*", "*.lora_A", "*.lora_B", "*.lora_A.*", "*.lora_B.*"}
    old |= {"*.lora_embedding_A.*", "*.lora_embedding_B.*", "*.lora_magnitude_vector.*"}
    with pytest.warns(DeprecationWarning, match="pe_globs"):
        alias = layout.PE_GLOBS
    assert alias == pe_globs() and old <= set(alias)


def test_a_new_kind_is_one_class_and_is_never_counted_as_backbone():
    from metakit.peft import kinds
    from metakit.peft.modules import PELinear

    class Gain(PEKind):
        """A learned per-feature gain on a linear layer's output."""

        name = "test_gain"
        param_names = ("test_gain",)

        @staticmethod
        def apply(layer, x, y):
            return y * layer.test_gain

    try:
        model, data = tiny_bert(), batch()
        before = logits(model, data)
        path = "bert.encoder.layer.0.output.dense"
        layer = PELinear.wrap(model.get_submodule(path))
        layer.test_gain = torch.nn.Parameter(torch.full((HIDDEN,), 2.0))
        layer.push("test_gain")
        model.set_submodule(path, layer)
        name = f"{path}.test_gain"
        assert name not in backbone_spec(model).names(model)
        assert Gain.spec().names(model) == [name]
        assert not torch.allclose(logits(model, data), before)  # the host applies it
        with torch.no_grad():
            layer.test_gain.fill_(1.0)
        assert torch.equal(logits(model, data), before)
    finally:
        kinds._REGISTRY.pop("test_gain", None)


@pytest.mark.parametrize("names", [None, (), ("a.b",), ["lora_X"]])
def test_a_kind_without_parameter_names_is_refused(names):
    attributes = {"name": "test_bad"} | ({} if names is None else {"param_names": names})
    with pytest.raises(TypeError, match="must declare `param_names`"):
        type("Bad", (PEKind,), attributes)
    assert "test_bad" not in pe_kinds()


def test_lora_acts_inside_a_houlsby_adapter_on_one_layer():
    model = tiny_bert()
    add_houlsby_adapters(model, BOTTLENECK, init_std=0.3)
    add_lora(model, targets="*.attention.output.dense", rank=RANK)
    layer = model.bert.encoder.layer[0].attention.output.dense
    assert layer.pe_stack == ("lora", "houlsby")  # ordered by stage, not by insertion order
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(2, 3, HIDDEN)
        inside = (
            F.linear(x, layer.weight, layer.bias) + x @ layer.lora_A.T @ layer.lora_B.T * layer.lora_scale
        )
        assert torch.allclose(layer(x), layer.adapter(inside), atol=1e-6)
    assert "lora_rank=4" in repr(layer) and "houlsby" in repr(layer)
    plain = model.bert.encoder.layer[0].attention.self.query
    assert type(plain) is torch.nn.Linear
