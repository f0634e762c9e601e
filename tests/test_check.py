"""metakit.check (metakit.preflight): each finding on a small model that has it, and nothing on a clean one."""

import doctest

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn
from torch.autograd.function import once_differentiable

import metakit as mk
from metakit import preflight as check_module
from metakit.preflight import Report, check
from metakit.tasks import mse_loss


def squared_error(forward, batch):
    x, y = batch
    return ((forward(x) - y) ** 2).mean()


def _learner(model, inner=None, outer=None, strategy=None, loss_fn=squared_error, steps=1):
    return mk.MetaLearner(
        model,
        loss_fn,
        inner=mk.InnerLoop(inner or mk.everything(), torchopt.sgd(lr=0.1), steps=steps),
        outer_params=outer or mk.everything(),
        strategy=strategy or mk.SecondOrder(),
    )


def _mlp(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), *middle, nn.Tanh(), nn.Linear(8, 1))


def _batch(n=6, features=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=generator), torch.randn(n, 1, generator=generator)


def _only(report: Report, kind: str):
    assert report.kinds() == {kind}, str(report)
    (finding,) = report.of_kind(kind)
    return finding


@pytest.mark.parametrize(
    "strategy",
    [
        mk.SecondOrder(),
        mk.FirstOrder(),
        mk.Truncated(1),
        mk.Reptile(),
        mk.Implicit(),
        mk.SecondOrder(hvp="forward"),
    ],
)
def test_clean_model_reports_nothing_and_is_left_untouched(strategy):
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = check(model, _learner(model, strategy=strategy), _batch())
    assert len(report) == 0 and report.ok, str(report)
    assert "nothing found" in str(report)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None


def test_batchnorm_statistics_updated_in_place_are_reported_and_restored():
    model = _mlp(nn.BatchNorm1d(8))
    report = check(model, _learner(model), _batch())
    finding = _only(report, "buffer-update")
    assert finding.where == "1" and finding.severity == "warning"
    assert "running_mean" in finding.what and "num_batches_tracked" in finding.what
    assert "InnerLoop(buffers='task')" in finding.fix and "track_running_stats=False" in finding.fix
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.running_var, torch.ones(8))

    model.eval()  # eval-mode statistics: nothing is updated, nothing to report
    assert len(check(model, _learner(model), _batch())) == 0


def test_active_dropout_is_reported_where_it_runs_and_not_in_eval_mode():
    model = _mlp(nn.Dropout(0.2))
    rng = torch.get_rng_state()
    finding = _only(check(model, _learner(model), _batch()), "dropout")
    assert finding.where == "1" and finding.severity == "warning"
    assert "random" in finding.what and "eval()" in finding.fix
    assert torch.equal(torch.get_rng_state(), rng)  # the user's seed sequence is untouched
    model.eval()
    assert len(check(model, _learner(model), _batch())) == 0


class _SquareOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _Square(torch.autograd.Function):
    """Twice differentiable (torch ops in backward), but without a jvp rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareDetached(torch.autograd.Function):
    """Right first derivative, but its backward leaves autograd: the second-order term is lost."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * grad.detach()


class _Apply(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(x)


def test_custom_function_marked_once_differentiable_is_named_with_its_module():
    model = nn.Sequential(nn.Linear(3, 8), nn.Sequential(nn.Identity(), _Apply(_SquareOnce)), nn.Linear(8, 1))
    finding = _only(check(model, _learner(model), _batch()), "no-double-backward")
    assert finding.where == "1.1" and finding.severity == "error"
    assert "_SquareOnce" in finding.what and "once_differentiable" in finding.what
    assert not check(model, _learner(model), _batch()).ok
    # First order never differentiates the backward: nothing to report.
    assert len(check(model, _learner(model, strategy=mk.FirstOrder()), _batch())) == 0


def test_custom_function_whose_backward_leaves_autograd_is_found_by_the_probe():
    model = nn.Sequential(nn.Linear(3, 8), _Apply(_SquareDetached), nn.Linear(8, 1))
    finding = _only(check(model, _learner(model), _batch()), "no-double-backward")
    assert finding.where == "1" and "_SquareDetached" in finding.what and "silently" in finding.what
    # The same Function written with torch ops in its backward is twice differentiable: nothing to report.
    model = nn.Sequential(nn.Linear(3, 8), _Apply(_Square), nn.Linear(8, 1))
    assert len(check(model, _learner(model), _batch())) == 0


def test_op_without_double_backward_found_by_a_real_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 1))
    batch = (torch.randint(0, 10, (6, 3)), torch.randn(6, 1))
    finding = _only(check(model, _learner(model), batch), "no-double-backward")
    assert finding.where == "0" and "_embedding_bag" in finding.what
    # Only the head adapts: the inner gradient does not go through the bag's backward.
    assert len(check(model, _learner(model, inner=mk.select("1.*")), batch)) == 0


def test_loss_without_double_backward_is_located_in_the_loss():
    model = _mlp()

    def margin_loss(forward, batch):
        x, _ = batch
        return F.multi_margin_loss(forward(x).expand(-1, 3), torch.zeros(len(x), dtype=torch.long))

    finding = _only(check(model, _learner(model, loss_fn=margin_loss), _batch()), "no-double-backward")
    assert finding.where == "(loss)" and "multi_margin_loss" in finding.what


def test_cudnn_rnn_is_reported_for_second_order_only(monkeypatch):
    monkeypatch.setattr(check_module, "_uses_cudnn", lambda module: True)
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    model = Tagger()
    batch = (torch.randn(2, 5, 3), torch.randn(2, 5, 1))
    finding = _only(check(model, _learner(model), batch), "no-double-backward")
    assert finding.where == "rnn" and finding.severity == "error"
    assert "cudnn.flags(enabled=False)" in finding.fix
    assert _only(
        check(model, _learner(model, strategy=mk.FirstOrder()), batch), "no-double-backward"
    ).severity == ("info")
    monkeypatch.undo()  # on CPU the native LSTM kernel is twice differentiable
    assert len(check(model, _learner(model), batch)) == 0


def test_forward_mode_gaps_are_reported_only_for_forward_hvp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 1))
    batch = (torch.randint(0, 10, (6, 3)), torch.randn(6, 1))
    finding = _only(
        check(model, _learner(model, strategy=mk.SecondOrder(hvp="forward")), batch), "no-forward-ad"
    )
    assert finding.where == "0" and "_embedding_bag" in finding.what and "SecondOrder()" in finding.fix
    # Only the head adapts: no tangent reaches the bag.
    assert (
        len(
            check(
                model, _learner(model, inner=mk.select("1.*"), strategy=mk.SecondOrder(hvp="forward")), batch
            )
        )
        == 0
    )

    model = nn.Sequential(nn.Linear(3, 8), _Apply(_Square), nn.Linear(8, 1))
    finding = _only(
        check(model, _learner(model, strategy=mk.SecondOrder(hvp="forward")), _batch()), "no-forward-ad"
    )
    assert finding.where == "1" and "_Square" in finding.what
    assert len(check(model, _learner(model), _batch())) == 0  # twice differentiable: fine in reverse


def torch_mse_loss(forward, batch):
    x, y = batch
    return F.mse_loss(forward(x), y)


def test_mse_loss_under_forward_hvp_is_reported_in_the_loss():
    model = _mlp()
    finding = _only(
        check(
            model, _learner(model, loss_fn=torch_mse_loss, strategy=mk.SecondOrder(hvp="forward")), _batch()
        ),
        "no-forward-ad",
    )
    assert finding.where == "(loss)" and "mse_loss" in finding.what and "** 2" in finding.fix
    assert len(check(model, _learner(model, loss_fn=torch_mse_loss), _batch())) == 0
    # metakit's own mse_loss is written out, so it works under forward over reverse.
    assert (
        len(check(model, _learner(model, loss_fn=mse_loss, strategy=mk.SecondOrder(hvp="forward")), _batch()))
        == 0
    )


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 1, 4).unbind(2)
        return self.out(F.scaled_dot_product_attention(q, k, v).squeeze(2))


def _fused_kernel_runs() -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 2, 4)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _fused_kernel_runs(), reason="no fused SDPA kernel for these inputs on this build")
def test_fused_attention_is_reported_as_handled():
    torch.manual_seed(0)
    model = _Attention()
    batch = (torch.randn(2, 5, 4), torch.randn(2, 5, 1))
    report = check(model, _learner(model), batch)
    finding = _only(report, "fused-attention")
    assert finding.severity == "info" and finding.where == "(model)" and report.ok
    assert "math kernel" in finding.what and finding.fix == "nothing to do."
    first_order = _only(check(model, _learner(model, strategy=mk.FirstOrder()), batch), "fused-attention")
    assert "stays fused" in first_order.what


def test_frozen_parameters_inside_a_spec_are_listed():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    learner = _learner(model, inner=mk.select("0.*", "2.*"), outer=mk.select("2.*"))
    finding = _only(check(model, learner, _batch()), "frozen-in-spec")
    assert (
        finding.where == "0.weight" and "inner spec" in finding.what and "requires_grad_(True)" in finding.fix
    )


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 3, bias=False)
        self.decode = nn.Linear(3, 1)
        self.mix = nn.Linear(3, 3, bias=False)
        self.mix.weight = self.embed.weight

    def forward(self, x):
        return self.decode(torch.tanh(self.mix(torch.tanh(self.embed(x)))))


def test_tied_weights_split_between_inner_and_outer_are_reported():
    torch.manual_seed(0)
    model = _Tied()
    learner = _learner(model, inner=mk.select("mix.*", "decode.*"), outer=mk.select("decode.*", "embed.*"))
    finding = _only(check(model, learner, _batch()), "tied-split")
    assert finding.where == "embed.weight = mix.weight"
    assert "['mix.weight'] only; it is not in the inner set" in finding.what
    both = _learner(model, inner=mk.select("embed.*", "mix.*", "decode.*"))
    assert len(check(model, both, _batch())) == 0


def test_dtype_and_device_mismatches_between_model_and_batch():
    model = _mlp()
    x, y = _batch()
    report = check(model, _learner(model), (x.double(), y))
    assert report.kinds() == {"dtype-mismatch", "forward-failed"} and not report.ok, str(report)
    (finding,) = report.of_kind("dtype-mismatch")
    assert finding.where == "batch[0]" and "torch.float64" in finding.what and "torch.float32" in finding.what
    assert "dtype" in report.of_kind("forward-failed")[0].what  # the forward's own message says why

    # A float target of another dtype promotes silently: it runs, and the mismatch is still reported.
    report = check(model, _learner(model), (x, y.double()))
    assert _only(report, "dtype-mismatch").where == "batch[1]" and report.ok

    report = check(model, _learner(model), {"x": x.to("meta"), "y": y})
    finding = _only(report, "device-mismatch")
    assert finding.where == "batch['x']" and "meta" in finding.what


def test_a_failing_forward_is_one_finding_not_a_traceback():
    model = _mlp()
    finding = _only(check(model, _learner(model), _batch(features=5)), "forward-failed")
    assert "RuntimeError" in finding.what and "shapes cannot be multiplied" in finding.what


def test_report_prints_like_explain_and_task_uses_the_support_batch():
    model = _mlp(nn.BatchNorm1d(8), nn.Dropout(0.1))
    report = check(model, _learner(model), mk.Task(_batch(), _batch()))
    text = str(report)
    assert text.splitlines()[0] == (
        "check: Sequential with SecondOrder() on Sequential(), InnerLoop(buffers='update'), precision='fp32': 2 warnings"
    )
    assert "[warning] buffer-update at 1" in text and "[warning] dropout at 2" in text
    assert text.count("what follows:") == 2 and text.count("fix:") == 2


def test_a_tasks_own_loss_is_used_and_a_missing_loss_is_one_clear_error():
    model = _mlp()
    learner = _learner(model, loss_fn=None)
    assert len(check(model, learner, mk.Task(_batch(), _batch(), loss_fn=squared_error))) == 0
    with pytest.raises(ValueError, match="loss_fn=None"):
        check(model, learner, _batch())


def test_model_must_be_the_learners():
    with pytest.raises(ValueError, match=r"learner\.model is not this model"):
        check(_mlp(), _learner(_mlp()), _batch())


def test_tiny_bert_in_train_mode_reports_dropout_and_attention_only():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = BertForTokenClassification(config)
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "labels": torch.randint(0, 3, (2, 6))}
    learner = _learner(model, inner=mk.select("classifier.*"), loss_fn=lambda forward, b: forward(**b).loss)
    report = check(model, learner, batch)
    assert report.ok and report.kinds() <= {"dropout", "fused-attention"}, str(report)
    assert "bert.embeddings.dropout" in report.of_kind("dropout")[0].where
    model.eval()
    assert check(model, learner, batch).kinds() <= {"fused-attention"}


def test_docstring_examples_run():
    results = doctest.testmod(check_module)
    assert results.failed == 0 and results.attempted >= 8, results


# -- the executor, the buffer policy and the precision ---------------------------------------------
def _composed(model, *, buffers="update", strategy=None, executor=None):
    return mk.MetaLearner(
        model,
        squared_error,
        inner=mk.InnerLoop(mk.select("3.*"), torchopt.sgd(lr=0.1), steps=1, buffers=buffers),
        outer_params=mk.everything(),
        strategy=strategy or mk.SecondOrder(),
        executor=executor,
    )


@pytest.mark.parametrize("buffers", ["task", "frozen"])
def test_batchnorm_under_task_or_frozen_buffers_is_not_reported(buffers):
    model = _mlp(nn.BatchNorm1d(8))
    report = check(model, _composed(model, buffers=buffers), _batch())
    assert "buffer-update" not in report.kinds(), str(report)
    assert f"buffers={buffers!r}" in str(report)  # the title names the policy


def test_a_model_vmap_cannot_batch_is_reported_for_the_vmap_executor():
    class ItemCall(nn.Module):
        def forward(self, x):
            return x * float(x.abs().max().item() > 0)

    model = _mlp(ItemCall())
    report = check(model, _composed(model, executor=mk.executors.Vmap()), _batch())
    finding = _only(report, "vmap")
    assert finding.severity == "error" and "Sequential()" in finding.fix
    assert "vmap" not in check(model, _composed(model), _batch()).kinds()


def test_forward_mode_is_not_probed_where_vmap_runs_steps_reverse_over_reverse():
    class NoForwardRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad

    class Custom(nn.Module):
        def forward(self, x):
            return NoForwardRule.apply(x)

    model = _mlp(Custom())
    forward_mode = mk.SecondOrder(hvp="forward")
    assert "no-forward-ad" in check(model, _composed(model, strategy=forward_mode), _batch()).kinds()
    under_vmap = _composed(model, strategy=forward_mode, executor=mk.executors.Vmap())
    assert "no-forward-ad" not in check(model, under_vmap, _batch()).kinds()
