"""LoRA (Hu et al., 2021) on the linear layers chosen by module-name globs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft._targets import match_linears, target_patterns
from metakit.peft.kinds import REPARAMETERIZE, PEKind
from metakit.peft.modules import PELinear
from metakit.spec import Spec

__all__ = ["DEFAULT_LORA_TARGETS", "LoRA", "add_lora"]

#: The LoRA paper's choice for attention: the query and value projections of every layer.
DEFAULT_LORA_TARGETS = ("*.query", "*.value")


class LoRA(PEKind):
    """``y + scale · B A dropout(x)`` on a `PELinear`; ``lora_A [r, in]``, ``lora_B [out, r]``."""

    name = "lora"
    param_names = ("lora_A", "lora_B")
    stage = REPARAMETERIZE

    @staticmethod
    def attach(layer: PELinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Add ``A`` (Kaiming-uniform) and ``B`` (zeros) to ``layer``: its output is unchanged."""
        if layer.has(LoRA.name):
            raise ValueError("this layer already has LoRA; add_lora() can only add it once per layer.")
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, **factory))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, **factory))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # peft's and the LoRA paper's choice
        layer.lora_scale = alpha / rank
        layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layer.push(LoRA.name)

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + F.linear(F.linear(layer.lora_dropout(x), layer.lora_A), layer.lora_B) * layer.lora_scale

    @classmethod
    def describe(cls, layer: nn.Module) -> str:
        return f"lora_rank={layer.lora_A.shape[0]}"


def add_lora(
    model: nn.Module,
    targets: str | Sequence[str] = DEFAULT_LORA_TARGETS,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
) -> Spec:
    """Add LoRA factors to every ``nn.Linear`` whose dotted module name matches a target glob.

    ``W x + b`` becomes ``W x + b + (alpha / rank) · B A x`` with ``B`` zero-initialised, so the model's
    output at insertion is exactly unchanged. Two tensors (``lora_A`` ``[rank, in]``, ``lora_B``
    ``[out, rank]``) are added per targeted layer; original parameter names do not change.

    Args:
        model: any model with ``nn.Linear`` layers; modified in place.
        targets: ``fnmatch`` globs over module names, one meaning for a str or a list (``*`` crosses dots),
            e.g. ``"*.attention.self.query"``; every glob must match at least one ``nn.Linear``.
        rank: rank ``r`` of the update (``> 0``).
        alpha: scaling numerator (``> 0``); the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the LoRA branch's input.

    Returns:
        The spec selecting exactly the added tensors (``select('*.lora_A', '*.lora_B')``).

    Example:
        >>> lora = add_lora(model, targets=["*.query", "*.value"], rank=8)  # doctest: +SKIP
    """
    target_patterns(targets)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    chosen = match_linears(model, targets, "LoRA")
    for name, linear in chosen.items():
        if isinstance(linear, PELinear) and linear.has(LoRA.name):
            raise ValueError(f"{name} already has LoRA; add_lora() adds it once per layer.")
        if isinstance(linear, PELinear) and linear.has("tams"):
            raise ValueError(f"{name} is a TAMS sublayer; TAMS chooses among its own candidates.")
    added = []
    for name, linear in chosen.items():
        wrapped = PELinear.wrap(linear)
        LoRA.attach(wrapped, rank, alpha, dropout)
        model.set_submodule(name, wrapped)
        added += [f"{name}.lora_A", f"{name}.lora_B"]
    return exact_spec(model, added, "*.lora_A", "*.lora_B")
