"""A meta-learning task: a support batch to adapt on and a query batch to evaluate on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: ``loss_fn(forward, batch) -> scalar tensor``; ``forward`` is the model bound to a params dict.
LossFn = Callable[[Callable[..., Any], Any], torch.Tensor]

__all__ = ["LossFn", "Task"]


@dataclass
class Task:
    """One task of a meta-batch.

    Args:
        support: the batch the inner loop adapts on (any object the loss function understands).
        query: the batch the adapted parameters are evaluated on (the meta-loss).
        loss_fn: this task's own loss, for meta-batches that mix tasks of different kinds
            (Algorithm 1's set of loss functions); ``None`` uses the learner's loss.
    """

    support: Any
    query: Any
    loss_fn: LossFn | None = None
