"""Fidelity: how close each strategy's meta-gradient is to SecondOrder()'s (exact) on the same batch.

Implicit is the exception: the worker compares it with the exact gradient of its own proximal inner
problem (`metakit.bench.reference.proximal_reference_gradient`); SecondOrder()'s is stored beside
it as ``cosine_to_second_order``, for reference.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from metakit.bench.config import Config
from metakit.bench.measure import cosine_and_relative_error
from metakit.bench.strategies import EXACT_REFERENCE, entry

__all__ = ["add_fidelity"]


@functools.lru_cache(maxsize=2)  # the exact gradient of the current (workload, S) stays loaded
def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)


def add_fidelity(records: list[dict], grad_paths: Mapping[str, Path]) -> None:
    """Set ``cosine`` and ``rel_error`` on each record whose workload and S also ran under SecondOrder().

    Records that already have them, or whose SecondOrder run has not finished (yet), are left as
    they are; call again when it has.

    Args:
        records: worker records (``config`` holds workload, strategy, steps); updated in place.
        grad_paths: saved meta-gradients of the successful runs, by `Config.key`.
    """
    for record in records:
        config = Config(**record["config"])
        key, exact_key = config.key, replace(config, strategy=EXACT_REFERENCE).key
        own_reference = entry(config.strategy).proximal
        cosine_key, error_key = (
            ("cosine_to_second_order", "rel_error_to_second_order")
            if own_reference
            else ("cosine", "rel_error")
        )
        if key not in grad_paths or cosine_key in record:
            continue
        if exact_key not in grad_paths:
            record.setdefault("fidelity_note", f"no successful {EXACT_REFERENCE} run for this workload and S")
            continue
        if not own_reference:
            record.pop("fidelity_note", None)
        exact = _load(grad_paths[exact_key])
        record[cosine_key], record[error_key] = cosine_and_relative_error(_load(grad_paths[key]), exact)
