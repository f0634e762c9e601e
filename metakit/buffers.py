"""Buffers in the inner loop: what the inner loop's forwards do to BatchNorm statistics.

A module's forward in training mode updates its BatchNorm running statistics in place, and
``functional_call`` runs it on the module's own buffers, so by default every inner step moves them
(``num_batches_tracked`` counts every support forward). :class:`~metakit.InnerLoop` takes a policy:

- ``"update"`` (default): as today: the inner loop's forwards use batch statistics and update the
  module's running statistics in place.
- ``"task"``: each task gets its own copy of the buffers; its inner steps and its query forward use
  and update that copy, and the module's buffers are untouched.
- ``"frozen"``: during adaptation BatchNorm layers use their running statistics (as in ``eval()``)
  and update nothing; the query forward runs the module as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BUFFER_POLICIES", "BufferPolicy", "check_policy", "eval_statistics", "task_buffers"]

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


@contextlib.contextmanager
def eval_statistics(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the BatchNorm layers of ``model`` on their running statistics (their ``eval()`` behaviour).

    Only the ``training`` flag of those layers is switched, and it is restored on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training] if enabled else []
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer in layers:
            layer.training = True
