"""Spec algebra as tables of cases, De Morgan, combine ∘ split, explain, and a property test."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import metakit as mk


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.adapter = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1))


@pytest.fixture(scope="module")
def net():
    return Net()


ALL = [n for n, _ in Net().named_parameters()]


def names_where(pred):
    return [n for n in ALL if pred(n)]


CASES = [
    (mk.select("head.*"), names_where(lambda n: n.startswith("head."))),
    (mk.select("*.adapter.*"), names_where(lambda n: ".adapter." in n)),
    (mk.select("head.*", "scale"), names_where(lambda n: n.startswith("head.") or n == "scale")),
    (mk.select("layers.0.*"), names_where(lambda n: n.startswith("layers.0."))),
    (mk.select("no.such.*"), []),
    (mk.regex(r"layers\.\d+\.attn\.weight"), ["layers.0.attn.weight", "layers.1.attn.weight"]),
    (mk.regex(r"attn"), []),  # full match: a substring is not enough
    (mk.module_type(nn.LayerNorm), names_where(lambda n: ".norm." in n)),
    (
        mk.module_type(nn.Embedding, nn.LayerNorm),
        names_where(lambda n: ".norm." in n or n.startswith("embed")),
    ),
    (mk.module_type(Net), ["scale"]),  # owned directly by the root module
    (mk.everything(), ALL),
    (mk.nothing(), []),
    (
        mk.select("*.adapter.*") | mk.select("head.*"),
        names_where(lambda n: ".adapter." in n or n.startswith("head.")),
    ),
    (
        mk.select("layers.*") & mk.module_type(nn.Linear),
        names_where(lambda n: ".attn." in n or ".adapter." in n),
    ),
    (
        mk.select("layers.*") - mk.select("*.adapter.*"),
        names_where(lambda n: n.startswith("layers.") and ".adapter." not in n),
    ),
    (~mk.select("layers.*"), names_where(lambda n: not n.startswith("layers."))),
    (mk.everything() - mk.nothing(), ALL),
    (~mk.everything(), []),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_names_table(net, spec, expected):
    assert spec.names(net) == expected


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_combine_of_split_is_identity_with_same_tensors(net, spec, expected):
    params = dict(net.named_parameters())
    selected, rest = spec.split(params, model=net)
    assert list(selected) == expected
    assert not selected.keys() & rest.keys()
    rebuilt = mk.combine(selected, rest)
    assert rebuilt.keys() == params.keys()
    assert all(rebuilt[n] is params[n] for n in params)


A, B, C = mk.select("layers.0.*"), mk.module_type(nn.Linear), mk.regex(r".*bias")
IDENTITIES = [
    ("~(a | b) == ~a & ~b", ~(A | B), ~A & ~B),
    ("~(a & b) == ~a | ~b", ~(A & B), ~A | ~B),
    ("a - b == a & ~b", A - B, A & ~B),
    ("~~a == a", ~~A, A),
    ("a | (b & c) == (a | b) & (a | c)", A | (B & C), (A | B) & (A | C)),
    ("a | ~a == everything", A | ~A, mk.everything()),
    ("a & ~a == nothing", A & ~A, mk.nothing()),
]


@pytest.mark.parametrize(("label", "left", "right"), IDENTITIES, ids=[i[0] for i in IDENTITIES])
def test_algebraic_identities(net, label, left, right):
    assert left.names(net) == right.names(net)


def test_names_follow_model_order_not_argument_order(net):
    assert mk.select("head.*", "embed.*").names(net) == mk.select("embed.*", "head.*").names(net)
    assert (mk.select("head.*") | mk.select("embed.*")).names(net)[0] == "embed.weight"


REPRS = [
    (mk.select("adapter.*") | mk.select("head.*"), "select('adapter.*') | select('head.*')"),
    ((A | B) - C, "(select('layers.0.*') | module_type(Linear)) - regex('.*bias')"),
    (A | B - C, "select('layers.0.*') | module_type(Linear) - regex('.*bias')"),
    (A - (B - C), "select('layers.0.*') - (module_type(Linear) - regex('.*bias'))"),
    (~(A | B), "~(select('layers.0.*') | module_type(Linear))"),
    (~A & B, "~select('layers.0.*') & module_type(Linear)"),
    (mk.everything() - mk.nothing(), "everything() - nothing()"),
]


@pytest.mark.parametrize(("spec", "text"), REPRS, ids=[r[1] for r in REPRS])
def test_repr_reads_like_the_expression_and_round_trips(net, spec, text):
    assert repr(spec) == text
    env = {
        "select": mk.select,
        "regex": mk.regex,
        "everything": mk.everything,
        "nothing": mk.nothing,
        "module_type": mk.module_type,
        "Linear": nn.Linear,
    }
    assert eval(text, env).names(net) == spec.names(net)  # the printed expression means the same thing


def test_tied_parameters_are_reported_once_by_first_name():
    model = nn.Module()
    model.embed = nn.Embedding(5, 3)
    model.out = nn.Linear(3, 5, bias=False)
    model.out.weight = model.embed.weight
    assert mk.everything().names(model) == ["embed.weight"]
    assert mk.select("out.*").names(model) == []  # the tied alias is not a separate parameter
    text = mk.explain(model, all=mk.everything())
    assert "Module: 1 tensors, 15 elements" in text
    assert "  out.weight = embed.weight" in text


def test_explain_counts_shares_overlaps_and_leftovers(net):
    text = mk.explain(net, inner=mk.select("*.adapter.*", "head.*"), outer=mk.select("layers.*"))
    total = sum(p.numel() for p in net.parameters())
    adapter_elems = sum(p.numel() for n, p in net.named_parameters() if ".adapter." in n)
    head_elems = sum(p.numel() for n, p in net.named_parameters() if n.startswith("head."))
    inner_row = next(line for line in text.splitlines() if line.startswith("inner"))
    assert re.search(rf"\b{len(mk.select('*.adapter.*', 'head.*').names(net))}\b", inner_row)
    assert f"{adapter_elems + head_elems:,}" in inner_row
    assert f"{100 * (adapter_elems + head_elems) / total:.3f}%" in inner_row
    assert "in several groups (8)" in text  # the four adapter tensors of each of the two layers
    assert "layers.0.adapter.0.weight: inner, outer" in text
    assert "in no group (2)" in text and "  embed.weight" in text and "  scale" in text


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: mk.select(3), TypeError, r"select\(\) expects glob strings.*got int 3"),
        (lambda: mk.select(), ValueError, "at least one glob"),
        (lambda: mk.regex("layers.(("), ValueError, r"invalid regular expression 'layers.\(\('"),
        (lambda: mk.regex(None), TypeError, "expects a pattern string"),
        (lambda: mk.module_type("Linear"), TypeError, r"nn.Module subclasses.*got 'Linear'"),
        (lambda: mk.module_type(int), TypeError, "nn.Module subclasses"),
        (lambda: mk.select("a") | "b", TypeError, r"Spec \| expects another Spec, got str"),
        (lambda: mk.explain(nn.Linear(1, 1), g="x"), TypeError, "expects another Spec"),
    ],
)
def test_bad_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_module_type_split_needs_the_model(net):
    with pytest.raises(ValueError, match="needs the model"):
        mk.module_type(nn.Linear).split(dict(net.named_parameters()))


def test_combine_refuses_overlap():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match=r"same parameter in several dicts: \['a'\]"):
        mk.combine({"a": t}, {"a": t})


# -- property test over random module trees ---------------------------------------------------------
LEAF_TYPES = [
    lambda: nn.Linear(2, 2),
    lambda: nn.LayerNorm(2),
    lambda: nn.Embedding(3, 2),
    lambda: nn.Conv1d(1, 1, 1),
]
SEGMENTS = st.sampled_from(["enc", "dec", "adapter", "head", "attn", "ffn", "0", "1"])


@st.composite
def module_trees(draw, depth=0):
    module = nn.Module()
    for i, segment in enumerate(draw(st.lists(SEGMENTS, min_size=1, max_size=3, unique=True))):
        if depth < 2 and draw(st.booleans()):
            child = draw(module_trees(depth=depth + 1))
        else:
            child = LEAF_TYPES[draw(st.integers(0, len(LEAF_TYPES) - 1))]()
        module.add_module(f"{segment}{i}" if segment.isdigit() else segment, child)
    return module


SPECS = st.deferred(
    lambda: st.one_of(
        st.builds(mk.select, st.sampled_from(["*", "enc*", "*.adapter.*", "*weight", "head.*", "*.0*"])),
        st.builds(mk.regex, st.sampled_from([r".*bias", r"enc\..*", r"[a-z]+\.weight"])),
        st.builds(mk.module_type, st.sampled_from([nn.Linear, nn.LayerNorm, nn.Embedding])),
        st.just(mk.everything()),
        st.just(mk.nothing()),
        st.builds(lambda a, b: a | b, SPECS, SPECS),
        st.builds(lambda a, b: a & b, SPECS, SPECS),
        st.builds(lambda a, b: a - b, SPECS, SPECS),
        st.builds(lambda a: ~a, SPECS),
    )
)


@settings(max_examples=150, deadline=None)
@given(model=module_trees(), a=SPECS, b=SPECS)
def test_spec_algebra_is_set_algebra_on_random_trees(model, a, b):
    universe = [n for n, _ in model.named_parameters()]
    sa, sb = set(a.names(model)), set(b.names(model))
    assert set((a | b).names(model)) == sa | sb
    assert set((a & b).names(model)) == sa & sb
    assert set((a - b).names(model)) == sa - sb
    assert set((~a).names(model)) == set(universe) - sa
    assert (~(a | b)).names(model) == (~a & ~b).names(model)
    assert (~(a & b)).names(model) == (~a | ~b).names(model)
    for spec in (a, b, a | b, a - b):
        names = spec.names(model)
        assert names == [n for n in universe if n in set(names)]  # model order
        params = dict(model.named_parameters())
        selected, rest = spec.split(params, model=model)
        assert list(selected) == names
        assert all(mk.combine(selected, rest)[n] is params[n] for n in params)
