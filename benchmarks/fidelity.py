"""Fidelity: how close each strategy's meta-gradient is to SecondOrder's (exact) on the same batch."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.config import Config
from benchmarks.measure import cosine_and_relative_error

__all__ = ["EXACT", "add_fidelity"]

EXACT = "second-order"


@functools.lru_cache(maxsize=2)  # the exact gradient of the current (workload, S) stays loaded
def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)


def add_fidelity(records: list[dict], grad_paths: Mapping[str, Path]) -> None:
    """Set ``cosine`` and ``rel_error`` on each record whose workload and S also ran under SecondOrder.

    Records that already have them, or whose SecondOrder run has not finished (yet), are left as
    they are; call again when it has.

    Args:
        records: worker records (``config`` holds workload, strategy, steps); updated in place.
        grad_paths: saved meta-gradients of the successful runs, by :attr:`Config.key`.
    """
    for record in records:
        config = Config(**record["config"])
        key, exact_key = config.key, replace(config, strategy=EXACT).key
        if key not in grad_paths or "cosine" in record:
            continue
        if exact_key not in grad_paths:
            record["fidelity_note"] = f"no successful {EXACT} run for this workload and S"
            continue
        record.pop("fidelity_note", None)
        exact = _load(grad_paths[exact_key])
        record["cosine"], record["rel_error"] = cosine_and_relative_error(_load(grad_paths[key]), exact)
