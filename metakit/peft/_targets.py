"""Resolve target globs to the ``nn.Linear`` layers a PE insertion modifies, with one clear error."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from metakit.peft.kinds import inside_pe_module


def target_patterns(targets: str | Sequence[str]) -> list[str]:
    """``targets`` as a list of globs; a ``TypeError`` for anything else or an empty list."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"targets must be a glob string or a non-empty list of them, got {targets!r}.")
    return patterns


def match_linears(model: nn.Module, targets: str | Sequence[str], what: str) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` layers whose dotted names match a target glob, in model order.

    Linears inside modules a PE insertion added (an adapter's ``down``, TARP's generator) are never
    targets. Raises a ``ValueError`` naming the first glob that matches no linear layer and listing
    some real linear names.
    """
    patterns = target_patterns(targets)
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and not inside_pe_module(name)
    }
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"{what} target {pattern!r} matches no nn.Linear in {type(model).__name__}. Targets are "
                f"fnmatch globs over dotted module names ('*' crosses dots); some nn.Linear names: "
                f"{list(linears)[:6]}."
            )
        chosen.update(hits)
    return {name: module for name, module in linears.items() if name in chosen}


def check_rank(rank: int, linears: dict[str, nn.Linear], what: str) -> None:
    """Raise unless ``0 < rank <= min(in_features, out_features)`` for every linear layer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{what} rank must be a positive int, got {rank!r}.")
    too_small = {
        n: (m.out_features, m.in_features)
        for n, m in linears.items()
        if rank > min(m.in_features, m.out_features)
    }
    if too_small:
        name, (out, inp) = next(iter(too_small.items()))
        raise ValueError(
            f"{what} rank {rank} is above the dimensions of {len(too_small)} target layer(s), e.g. {name} "
            f"with weight [{out}, {inp}]; a rank-r factorization needs r <= min(out, in) = {min(out, inp)}."
        )
