"""TARP: task-adaptive reparameterization (Hou, Salazar & Polovets, 2022, "Meta-Learning the Difference").

TARP adapts a pretrained weight matrix ``W⁰ ∈ R^{out×in}`` of a linear layer by a *dynamic* low-rank
reparameterization: a multiplicative and an additive low-rank term whose diagonal core depends on
the layer's input,

    W(x) = W⁰ ⊙ R¹(x) + R²(x)                                                     (paper, Eq. 2)
    Rⁱ(x) = Uⁱ Σⁱ(x) Vⁱᵀ,   Σⁱ(x) = diag(σⁱ(x))                                  (paper, Eq. 3)

with ``Uⁱ ∈ R^{out×r}``, ``Vⁱ ∈ R^{in×r}``, ``⊙`` the element-wise product and ``σⁱ`` a light generator
of the ``r`` diagonal entries from the input. The layer computes ``y = W(x) x + b`` per token.

Source note: written from the paper's abstract and published summaries (the full text was not
reachable offline). Those confirm the forms used here (an element-wise ``W⁰ ⊙ R¹`` plus ``R²``, a
diagonal core that depends on the input; a DARTS-style controller with continuous weights); the
equation numbers are those of arXiv 2207.03509v1 as best reconstructed and should be checked.

Choices the paper leaves open, made here (listed in the report):

- **Near-identity.** ``R¹`` is written as ``J + U¹Σ¹V¹ᵀ`` (``J`` all ones), i.e. ``W(x) = W⁰ + W⁰ ⊙
  (U¹Σ¹(x)V¹ᵀ) + U²Σ²(x)V²ᵀ``, and the task factors ``U¹, U²`` start at zero: the model's output at
  insertion is exactly the pretrained one (LoRA's zero-``B`` trick).
- **Which factors adapt.** The output-side factors ``Uⁱ`` (``tarp.task_mul``, ``tarp.task_add``) are
  the *task-adaptive* factors, updated in the inner loop; the input-side factors ``Vⁱ``
  (``tarp.shared_mul``, ``tarp.shared_add``) are *shared* across tasks and meta-learned, and so is the
  diagonal's generator (``tarp.diag``): `TarpSpecs` ``.inner`` / ``.outer``.
- **The generator.** ``σ(x) = 1 + tanh(G x + c)`` per token (``G ∈ R^{2r×in}``, ``c`` zero-initialised,
  so ``Σ = I`` at insertion and stays in ``(0, 2)``). Per token rather than pooled over the sequence,
  so a causal language model never sees later tokens through ``Σ``.
- **Initialisation.** ``Vⁱ`` Kaiming-uniform as LoRA's ``A`` (peft's choice); ``Uⁱ``, ``G``, ``c`` zeros.
- **Computation.** ``W(x)`` is never formed: ``(W⁰ ⊙ u vᵀ) x = u ⊙ (W⁰ (v ⊙ x))``, so the
  multiplicative term costs ``r`` extra products with ``W⁰`` and the additive one two thin ones.

Example:
    >>> from metakit.peft import add_tarp, head_spec
    >>> tarp = add_tarp(model, rank=4, targets=["*.query", "*.value"])  # doctest: +SKIP
    >>> inner, outer = tarp.inner | head_spec(model), tarp.outer  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft._targets import check_rank, match_linears
from metakit.peft.kinds import REPARAMETERIZE, PEKind
from metakit.peft.modules import PELinear
from metakit.spec import Spec

__all__ = ["DEFAULT_TARP_TARGETS", "TARP", "TarpFactors", "TarpSpecs", "add_tarp", "tarp_parameter_count"]

#: As LoRA's default: the query and value projections of every layer.
DEFAULT_TARP_TARGETS = ("*.query", "*.value")

#: Task-adaptive (inner) and shared (outer) tensors of one TARP layer, relative to the layer.
TASK_FACTORS = ("tarp.task_mul", "tarp.task_add")
SHARED_FACTORS = ("tarp.shared_mul", "tarp.shared_add", "tarp.diag.weight", "tarp.diag.bias")


class TarpFactors(nn.Module):
    """The factors of one TARP layer: ``U¹, U²`` (task), ``V¹, V²`` (shared) and the generator ``G, c``.

    Args:
        in_features, out_features: the adapted weight's shape is ``[out_features, in_features]``.
        rank: ``r``, the rank of each of ``R¹ - J`` and ``R²``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.rank = rank
        self.task_mul = nn.Parameter(torch.zeros(out_features, rank, **factory))  # U¹
        self.task_add = nn.Parameter(torch.zeros(out_features, rank, **factory))  # U²
        self.shared_mul = nn.Parameter(torch.empty(rank, in_features, **factory))  # V¹ᵀ
        self.shared_add = nn.Parameter(torch.empty(rank, in_features, **factory))  # V²ᵀ
        self.diag = nn.Linear(in_features, 2 * rank, **factory)  # σ(x) = 1 + tanh(G x + c)
        for shared in (self.shared_mul, self.shared_add):
            nn.init.kaiming_uniform_(shared, a=math.sqrt(5))
        nn.init.zeros_(self.diag.weight)
        nn.init.zeros_(self.diag.bias)

    def diagonals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ¹(x), σ²(x))``, each ``[..., r]``: the input-dependent diagonals of Eq. 3."""
        sigma = 1.0 + torch.tanh(self.diag(x))
        return sigma[..., : self.rank], sigma[..., self.rank :]

    def delta(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(W(x) - W⁰) x = (W⁰ ⊙ U¹Σ¹(x)V¹ᵀ) x + U²Σ²(x)V²ᵀ x`` for inputs ``x [..., in]``."""
        sigma_mul, sigma_add = self.diagonals(x)
        additive = F.linear(sigma_add * F.linear(x, self.shared_add), self.task_add)
        # (W⁰ ⊙ u_k v_kᵀ) x = u_k ⊙ (W⁰ (v_k ⊙ x)), summed over the r rank-one terms
        through_weight = F.linear(x.unsqueeze(-2) * self.shared_mul, weight)  # [..., r, out]
        multiplicative = torch.einsum("...k,...ko,ok->...o", sigma_mul, through_weight, self.task_mul)
        return multiplicative + additive


class TARP(PEKind):
    """TARP on a `PELinear`: ``y + (W(x) - W⁰) x`` (Eqs. 2-3 of Hou et al.)."""

    name = "tarp"
    param_names = ("tarp",)
    stage = REPARAMETERIZE

    @staticmethod
    def attach(layer: PELinear, rank: int) -> None:
        """Give ``layer`` TARP factors of rank ``rank``; its output is unchanged."""
        if layer.has(TARP.name):
            raise ValueError("this layer already has TARP; add_tarp() adds it once per layer.")
        layer.tarp = TarpFactors(
            layer.in_features, layer.out_features, rank, device=layer.weight.device, dtype=layer.weight.dtype
        )
        layer.push(TARP.name)

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + layer.tarp.delta(layer.weight, x)

    @classmethod
    def describe(cls, layer: nn.Module) -> str:
        return f"tarp_rank={layer.tarp.rank}"


@dataclass(frozen=True)
class TarpSpecs:
    """The specs of what `add_tarp` added, split as the paper assigns them.

    Attributes:
        inner: the task-adaptive factors ``U¹, U²`` (``*.tarp.task_mul``, ``*.tarp.task_add``).
        outer: the shared, meta-learned factors ``V¹, V²`` and the diagonal's generator ``G, c``.
    """

    inner: Spec
    outer: Spec

    @property
    def all(self) -> Spec:
        """Every TARP tensor: ``inner | outer``."""
        return self.inner | self.outer


def tarp_parameter_count(in_features: int, out_features: int, rank: int) -> dict[str, int]:
    """Elements TARP adds to one ``[out, in]`` layer: ``{"inner": 2·out·r, "outer": 2·r·in + 2r·in + 2r}``."""
    return {"inner": 2 * out_features * rank, "outer": 2 * rank * in_features + 2 * rank * (in_features + 1)}


def add_tarp(
    model: nn.Module, rank: int = 4, targets: str | Sequence[str] = DEFAULT_TARP_TARGETS
) -> TarpSpecs:
    """Reparameterize every ``nn.Linear`` matching a target glob with TARP (see the module docstring).

    ``W x + b`` becomes ``W(x) x + b`` with ``W(x) = W⁰ ⊙ R¹(x) + R²(x)`` (Eq. 2), ``Rⁱ(x) =
    UⁱΣⁱ(x)Vⁱᵀ`` (Eq. 3, ``R¹`` centred on all-ones). The task factors start at zero, so the model's
    output at insertion is the pretrained one (tests: within 1e-6). Original parameter names do not
    change; each targeted layer gains six tensors under ``<layer>.tarp``.

    Args:
        model: any model with ``nn.Linear`` layers; modified in place.
        rank: ``r`` (``0 < r <= min(in, out)`` of every targeted layer).
        targets: ``fnmatch`` globs over module names (``*`` crosses dots); each must match a linear layer.

    Returns:
        `TarpSpecs` with ``.inner`` (task-adaptive factors), ``.outer`` (shared factors and the
        diagonal's generator) and ``.all``.

    Example:
        >>> tarp = add_tarp(model, rank=4)  # doctest: +SKIP
        >>> learner = mk.MetaLearner(model, loss_fn,
        ...     inner=mk.InnerLoop(tarp.inner | head, torchopt.sgd(lr=0.05), steps=3),
        ...     outer_params=tarp.outer | tarp.inner, strategy=mk.FirstOrder())  # doctest: +SKIP
    """
    chosen = match_linears(model, targets, "TARP")
    check_rank(rank, chosen, "TARP")
    for name, linear in chosen.items():
        if isinstance(linear, PELinear) and (linear.has(TARP.name) or linear.has("tams")):
            what = "TARP" if linear.has(TARP.name) else "a TAMS mixture (which has its own TARP candidate)"
            raise ValueError(f"{name} already has {what}; add_tarp() adds TARP once per layer.")
    for name, linear in chosen.items():
        wrapped = PELinear.wrap(linear)
        TARP.attach(wrapped, rank)
        model.set_submodule(name, wrapped)
    return tarp_specs(model, list(chosen))


def tarp_specs(model: nn.Module, layers: Sequence[str]) -> TarpSpecs:
    """The `TarpSpecs` of the TARP factors on ``layers`` (short globs when they are exact)."""
    inner = exact_spec(
        model, [f"{n}.{t}" for n in layers for t in TASK_FACTORS], *(f"*.{t}" for t in TASK_FACTORS)
    )
    outer_names = [f"{n}.{t}" for n in layers for t in SHARED_FACTORS]
    outer = exact_spec(model, outer_names, "*.tarp.shared_*", "*.tarp.diag.*")
    return TarpSpecs(inner=inner, outer=outer)
