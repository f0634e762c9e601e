"""bind(): same output as the module, gradients to the given params only, tied weights stay tied;
double_backward_safe(): second order through SDPA attention."""

import pytest
import torch
from torch import nn

import metakit as mk


class TinyLM(nn.Module):
    """A tiny language model with tied input/output embeddings and a buffer."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(torch.tanh(self.proj(h)))


@pytest.fixture
def lm():
    torch.manual_seed(0)
    model = TinyLM()
    model.eval()  # BatchNorm reads its running-stat buffers
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
    return model


TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_bind_with_own_params_equals_module(lm):
    params = dict(lm.named_parameters())
    torch.testing.assert_close(mk.bind(lm, params)(TOKENS), lm(TOKENS), rtol=0, atol=0)
    torch.testing.assert_close(mk.bind(lm, {})(TOKENS), lm(TOKENS), rtol=0, atol=0)


def test_bind_uses_given_params_and_keeps_the_rest(lm):
    new_proj = {"proj.weight": torch.zeros(6, 6), "proj.bias": torch.zeros(6)}
    out = mk.bind(lm, new_proj)(TOKENS)
    expected = lm.lm_head(torch.zeros(2, 4, 6))
    torch.testing.assert_close(out, expected)
    assert lm.proj.weight.abs().sum() > 0  # the module itself is unchanged


def test_gradients_flow_to_given_params_not_to_module(lm):
    params = {
        n: p.detach().clone().requires_grad_() for n, p in lm.named_parameters() if n.startswith("proj.")
    }
    loss = mk.bind(lm, params)(TOKENS).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert lm.proj.weight.grad is None
    assert lm.embed.weight.grad is not None  # not replaced: the module's own tensor is used


def test_tied_weights_stay_tied(lm):
    new_embed = torch.randn_like(lm.embed.weight)
    out = mk.bind(lm, {"embed.weight": new_embed})(TOKENS)
    reference = TinyLM()
    reference.load_state_dict(lm.state_dict())
    reference.eval()
    with torch.no_grad():
        reference.embed.weight.copy_(new_embed)  # one tensor: both the input and output embedding
    torch.testing.assert_close(out, reference(TOKENS))
    # Passing the alias name replaces the shared tensor too.
    torch.testing.assert_close(mk.bind(lm, {"lm_head.weight": new_embed})(TOKENS), out)


def test_tied_gradient_collects_both_uses(lm):
    weight = lm.embed.weight.detach().clone().requires_grad_()
    mk.bind(lm, {"embed.weight": weight})(TOKENS).sum().backward()
    lm(TOKENS).sum().backward()  # the module's own tied weight: gradient of the input and output use
    torch.testing.assert_close(weight.grad, lm.embed.weight.grad)
    assert lm.lm_head.weight.grad is lm.embed.weight.grad


def test_bind_refuses_two_values_for_one_tied_tensor(lm):
    with pytest.raises(ValueError, match="tied"):
        mk.bind(lm, {"embed.weight": torch.zeros(11, 6), "lm_head.weight": torch.ones(11, 6)})(TOKENS)


def test_bind_rejects_unknown_names(lm):
    with pytest.raises(KeyError, match=r"not parameters of TinyLM: \['prj.weight'\]"):
        mk.bind(lm, {"prj.weight": torch.zeros(6, 6)})


def _attention_second_order(q):
    out = nn.functional.scaled_dot_product_attention(q, q, q)
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), q)
    return gg


def test_double_backward_safe_runs_sdpa_second_order():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    with mk.double_backward_safe():
        safe = _attention_second_order(q)
    # The same computation written out by hand, which has a double backward by construction.
    q64 = q.detach().double().requires_grad_()

    def manual(x):
        weights = torch.softmax(x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return weights @ x

    (g,) = torch.autograd.grad(manual(q64).pow(2).sum(), q64, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), q64)
    torch.testing.assert_close(safe.double(), gg, rtol=1e-4, atol=1e-5)


def test_fused_sdpa_has_no_double_backward_without_the_context():
    """Documents why double_backward_safe exists; if PyTorch gains the derivative this will tell us."""
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        _attention_second_order(q)
