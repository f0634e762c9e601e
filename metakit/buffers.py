"""Buffers in the inner loop: what the inner loop's forwards do to BatchNorm statistics.

A module's forward in training mode updates its BatchNorm running statistics in place, and
``functional_call`` runs it on the module's own buffers, so by default every inner step moves them
(``num_batches_tracked`` counts every support forward). `InnerLoop` takes a policy:

- ``"update"`` (default): as today: the inner loop's forwards use batch statistics and update the
  module's running statistics in place.
- ``"task"``: each task gets its own copy of the buffers; its inner steps and its query forward use
  and update that copy, and the module's buffers are untouched.
- ``"frozen"``: the module's buffers are never changed by ``meta_step``. During adaptation
  BatchNorm layers use their running statistics (as in ``eval()``); the query forward runs the
  module in its own mode (batch statistics in ``train()``) on a throw-away copy. Every task of a
  meta-batch adapts on the same statistics, whichever executor runs it; update them yourself (or
  keep a pretrained model's).

A step that is run again — recomputed in the backward pass (``SecondOrder(checkpoint=k)``, and
``hvp="forward"``'s forward-over-reverse pass on dual tensors), or inside a ``torch.func`` transform
(``Vmap``, ``Implicit``'s optimality condition) — runs on a throw-away copy of the buffers, so
statistics are updated once per step and never by a transform (which may not write to a captured
tensor). For
BatchNorm this changes nothing the meta-gradient sees: a training-mode forward reads batch
statistics, never the running ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BUFFER_POLICIES",
    "BufferPolicy",
    "TaskBuffers",
    "check_policy",
    "eval_statistics",
    "task_buffers",
]

BufferPolicy = Literal["update", "task", "frozen"]
BUFFER_POLICIES = ("update", "task", "frozen")


def check_policy(policy: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``policy`` is one of them."""
    if policy not in BUFFER_POLICIES:
        raise ValueError(
            f"InnerLoop(buffers=...) must be one of {BUFFER_POLICIES} ('update': the inner loop updates "
            "the module's BatchNorm statistics in place; 'task': a copy per task; 'frozen': running "
            f"statistics during adaptation), got {policy!r}."
        )


def task_buffers(model: nn.Module, policy: BufferPolicy) -> dict[str, torch.Tensor]:
    """The buffers one task's forwards run on: the module's own, or a copy under ``"task"``."""
    buffers = dict(model.named_buffers())
    if policy == "task":
        return {name: value.clone() for name, value in buffers.items()}
    return buffers


class TaskBuffers:
    """The buffers one task's forwards run on under a policy, and whether BatchNorm uses running statistics.

    Args:
        model: the module whose buffers these are.
        policy: ``"update"``, ``"task"`` or ``"frozen"``.
        batched_like: under ``torch.func.vmap``, a zero of the task's batch: throw-away copies are made
            per task (``buffer + zero``) so that a forward may write to them.
    """

    def __init__(
        self,
        model: nn.Module | None,
        policy: BufferPolicy = "update",
        batched_like: torch.Tensor | None = None,
    ):
        check_policy(policy)
        self.model, self.policy, self.batched_like = model, policy, batched_like
        self.values = task_buffers(model, policy) if model is not None else {}

    def for_forward(self, *, adapting: bool, replay: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """``(buffers, eval_statistics)`` for one forward.

        Args:
            adapting: an inner-loop forward (else the query forward).
            replay: the forward runs again or inside a ``torch.func`` transform (a throw-away copy).
        """
        if self.policy == "frozen":
            if adapting:
                return self.values, True  # running statistics: nothing is written
            return self._scratch(), False
        if replay or self.batched_like is not None:
            return self._scratch(), False
        return self.values, False

    def _scratch(self) -> dict[str, torch.Tensor]:
        if not self.values:
            return self.values
        if self.batched_like is None:
            return {name: value.clone() for name, value in self.values.items()}
        zero = self.batched_like
        return {name: value + zero.to(value.dtype) for name, value in self.values.items()}


@contextlib.contextmanager
def eval_statistics(model: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Run the BatchNorm layers of ``model`` on their running statistics (their ``eval()`` behaviour).

    Only the ``training`` flag of those layers is switched, and it is restored on exit.
    """
    layers = (
        [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
        if enabled and model is not None
        else []
    )
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer in layers:
            layer.training = True
