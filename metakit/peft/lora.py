"""LoRA (Hu et al., 2021) on the linear layers chosen by module-name globs."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft.modules import PELinear
from metakit.spec import Spec

__all__ = ["DEFAULT_LORA_TARGETS", "add_lora"]

#: The LoRA paper's choice for attention: the query and value projections of every layer.
DEFAULT_LORA_TARGETS = ("*.query", "*.value")


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
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"targets must be a glob string or a non-empty list of them, got {targets!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    chosen: dict[str, nn.Linear] = {}
    for pattern in patterns:
        hits = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"LoRA target {pattern!r} matches no nn.Linear in {type(model).__name__}. Targets are fnmatch "
                f"globs over dotted module names; some nn.Linear names: {list(linears)[:6]}."
            )
        chosen.update((name, linears[name]) for name in hits)
    for name, linear in chosen.items():
        if isinstance(linear, PELinear) and linear.lora_A is not None:
            raise ValueError(f"{name} already has LoRA; add_lora() adds it once per layer.")
    added = []
    for name, linear in chosen.items():
        wrapped = PELinear.wrap(linear)
        wrapped.add_lora(rank, alpha, dropout)
        model.set_submodule(name, wrapped)
        added += [f"{name}.lora_A", f"{name}.lora_B"]
    return exact_spec(model, added, "*.lora_A", "*.lora_B")
