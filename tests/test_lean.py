"""The memory-lean exact modes, SecondOrder(hvp="forward"), SecondOrder(checkpoint=k) and both
combined, equal SecondOrder() (reverse over reverse) to 1e-10 in float64 on every configuration they
support."""

import pytest
import torch
import torchopt
from torch import nn

import metakit as mk
from metakit import recipes
from metakit.tasks import SineTasks, mse_loss

LEAN = [
    mk.SecondOrder(hvp="forward"),
    mk.SecondOrder(checkpoint=1),
    mk.SecondOrder(checkpoint=2),
    # Segments of forward-over-reverse steps: 4 steps as 3 + 1 (a short last segment) and as 2 + 2.
    mk.SecondOrder(hvp="forward", checkpoint=3),
    mk.SecondOrder(hvp="forward", checkpoint=2),
]


pytestmark = pytest.mark.usefixtures("float64")


def mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 1))


def sine(n=3, seed=0):
    return SineTasks(k_shot=6, k_query=6, seed=seed, dtype=torch.float64).sample(n)


def meta_grads(model, strategy, tasks, *, inner_spec=None, outer=None, optimizer=None, steps=4, seed=0, **kw):
    model.zero_grad()
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(
            inner_spec or mk.everything(),
            optimizer or torchopt.sgd(lr=0.1),
            steps=steps,
            **kw.pop("inner", {}),
        ),
        outer_params=outer or mk.everything(),
        strategy=strategy,
        **kw,
    )
    torch.manual_seed(seed)
    result = learner.meta_step(tasks, final_support_loss=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"lr:{k}": s.grad.clone() for k, s in learner.lr_scales.items()})
    return grads, result


def assert_same(expected, got):
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10, msg=name)


def check_equal(make_model, **kwargs):
    tasks = sine()
    expected, ref_result = meta_grads(make_model(), mk.SecondOrder(), tasks, **kwargs)
    assert all(g.abs().sum() > 0 for g in expected.values())
    for strategy in LEAN:
        got, result = meta_grads(make_model(), strategy, tasks, **kwargs)
        assert_same(expected, got)
        torch.testing.assert_close(result.inner_losses, ref_result.inner_losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.query_losses, ref_result.query_losses, rtol=1e-12, atol=1e-12)


def test_plain_sgd_every_parameter_adapts():
    check_equal(mlp)


def test_outer_only_parameters_get_the_mixed_term():
    # ANIL: only the last layer adapts, everything is meta-learned (backbone = outer only).
    check_equal(mlp, inner_spec=mk.select("4.*"))


def test_metasgd_scales():
    check_equal(mlp, inner={"learn_lr": True})


def test_momentum_inner_optimizer():
    check_equal(mlp, optimizer=torchopt.sgd(lr=0.05, momentum=0.9))


def test_adam_inner_optimizer():
    check_equal(mlp, optimizer=torchopt.adam(lr=0.01, eps_root=1e-8))


def test_first_task_head_with_frozen_parameters():
    def make():
        model = mlp()
        model[0].weight.requires_grad_(False)  # frozen: in neither set
        return model

    check_equal(
        make, inner_spec=mk.select("4.*", "2.*"), outer=mk.select("0.*", "2.*"), inner_only="first_task"
    )


def test_dropout_sees_the_same_random_numbers_when_recomputed():
    check_equal(lambda: mlp(dropout=0.3).train())


def test_a_single_inner_step():
    check_equal(mlp, steps=1)


def test_priming_through_hugging_face_attention():
    transformers = pytest.importorskip("transformers")
    import metakit.peft as mkpeft

    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )

    def make():
        torch.manual_seed(0)
        model = transformers.BertForTokenClassification(config).to(torch.float64).eval()
        assert model.config._attn_implementation == "sdpa"  # Hugging Face's default: fused attention
        return model

    def batch(seed):
        generator = torch.Generator().manual_seed(seed)
        return {
            "input_ids": torch.randint(0, 50, (2, 7), generator=generator),
            "labels": torch.randint(0, 3, (2, 7), generator=generator),
        }

    tasks = [mk.Task(batch(2 * i), batch(2 * i + 1)) for i in range(2)]

    def grads_for(strategy):
        model = make()
        adapter = mkpeft.add_top_adapter(model, bottleneck=4)
        learner = recipes.priming(
            model, lambda forward, b: forward(**b).loss, pe=adapter, head=mkpeft.head_spec(model), steps=3
        )
        learner.strategy = strategy
        learner.meta_step(tasks)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads_for(mk.SecondOrder())
    assert any("encoder.layer.0" in name for name in expected)  # the backbone's mixed term
    for strategy in LEAN:
        assert_same(expected, grads_for(strategy))


def test_hvp_forward_names_an_operation_without_forward_mode_rule():
    class NoForwardRule(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.tanh()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (1 - x.tanh() ** 2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x):
            return NoForwardRule.apply(self.linear(x))

    with pytest.raises(mk.ForwardModeError, match=r"NoForwardRule.*checkpoint=k"):
        meta_grads(Model(), mk.SecondOrder(hvp="forward"), sine(1), steps=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hvp": "backward"}, r"hvp=.*'reverse', 'forward'"),
        ({"checkpoint": 0}, r"checkpoint=.*int >= 1"),
        ({"checkpoint": 2.0}, r"checkpoint=.*int >= 1"),
        ({"checkpoint": True}, r"checkpoint=.*int >= 1"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.SecondOrder(**kwargs)


def test_truncated_longer_than_the_inner_loop_warns_once():
    strategy = mk.Truncated(5)
    with pytest.warns(UserWarning, match=r"Truncated\(5\).*only 2"):
        meta_grads(mlp(), strategy, sine(2), steps=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta_grads(mlp(), strategy, sine(2), steps=2)


def _kept_bytes(monkeypatch, strategy, steps):
    """Bytes the lean ops keep for the backward pass of one meta-step (distinct storages)."""
    storages = {}
    save = torch.autograd.function.FunctionCtx.save_for_backward

    def counting(ctx, *tensors):
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage)
        return save(ctx, *tensors)

    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", counting)
    meta_grads(mlp(), strategy, sine(1), steps=steps)
    monkeypatch.undo()
    return sum(storage.nbytes() for storage in storages.values())


def test_forward_segments_keep_segment_inputs_only(monkeypatch):
    """hvp="forward" keeps every step's inputs and gradient; with checkpoint=k only every k-th step's
    inputs, so what it keeps grows k times more slowly with S."""
    params = sum(p.numel() * p.element_size() for p in mlp().parameters())
    per_step = {}
    for strategy in (mk.SecondOrder(hvp="forward"), mk.SecondOrder(hvp="forward", checkpoint=4)):
        kept = [_kept_bytes(monkeypatch, strategy, steps) for steps in (8, 16)]
        per_step[repr(strategy)] = (kept[1] - kept[0]) / 8
    # inputs + gradient per step, against the inputs of one step in four
    assert per_step["SecondOrder(hvp='forward')"] == pytest.approx(2 * params, rel=0.05)
    assert per_step["SecondOrder(hvp='forward', checkpoint=4)"] == pytest.approx(params / 4, rel=0.05)


def test_hessian_vector_products_equal_a_double_backward_loop():
    """The step's dual-tensor pass gives H_pp v and the mixed term H_cp v of a hand-written
    ``autograd.grad(create_graph=True)`` loop, builds no graph, and leaves no dual level open."""
    from torch.autograd import forward_ad

    from metakit.buffers import TaskBuffers
    from metakit.inner import model_forward
    from metakit.step import InnerStep

    model = mlp(seed=3)
    (task,) = sine(1, seed=3)
    names = [name for name, _ in model.named_parameters()]
    inner_names, outer_names = names[2:], names[:2]  # the first layer is outer-only context
    params = {name: p.detach() for name, p in model.named_parameters()}
    step = InnerStep(None, model_forward(model, mse_loss), model, TaskBuffers(model, "update"), task.support)
    torch.manual_seed(0)
    tangents = {name: torch.randn_like(params[name]) for name in inner_names}

    inner = {name: params[name] for name in inner_names}
    live = {name: params[name] for name in outer_names}
    hvp, mixed = step.hessian_vector_products(0, inner, tangents, live)

    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    loss = step.loss(
        {name: leaves[name] for name in inner_names}, {name: leaves[name] for name in outer_names}
    )
    grads = torch.autograd.grad(loss, [leaves[name] for name in inner_names], create_graph=True)
    dot = sum((g * tangents[name]).sum() for g, name in zip(grads, inner_names, strict=True))
    expected = dict(zip(names, torch.autograd.grad(dot, [leaves[name] for name in names]), strict=True))

    for name in inner_names:
        torch.testing.assert_close(hvp[name], expected[name], rtol=1e-10, atol=1e-12)
        assert not hvp[name].requires_grad
    for name in outer_names:
        torch.testing.assert_close(mixed[name], expected[name], rtol=1e-10, atol=1e-12)
    assert expected[outer_names[0]].abs().sum() > 0  # the mixed term is not trivially zero
    with forward_ad.dual_level():  # the step's level was closed: a new one can open
        pass
