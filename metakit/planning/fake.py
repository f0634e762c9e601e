"""Fake copies of a model and a meta-batch: same shapes, dtypes and structure, no data.

The copy shares nothing with the original that a traced step could change: parameters and buffers
are new fake tensors (``FakeTensorMode.from_tensor``), the module tree is a ``copy.deepcopy`` whose
memo maps every real tensor to its fake, so no real tensor is cloned and tied weights stay tied.
A model whose parameters are already fake (built under ``FakeTensorMode``, e.g. a model too large to
allocate) is copied the same way, each tensor a fresh fake.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from metakit.task import Task

__all__ = ["FakeStep", "fake_mode_of", "fake_step"]


@dataclass
class FakeStep:
    """A fake model and meta-batch, and the real values of the batch (for data-dependent reads)."""

    mode: FakeTensorMode
    model: nn.Module
    tasks: list[Task]
    batch_values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def resident(self) -> Iterator[torch.Tensor]:
        """Tensors that exist before the step: parameters, buffers and the batch."""
        yield from self.model.parameters()
        yield from self.model.buffers()
        yield from (fake for fake, _ in self.batch_values)


def fake_mode_of(model: nn.Module) -> FakeTensorMode:
    """The fake mode of a model built under ``FakeTensorMode``, or a new one for a real model."""
    for tensor in _tensors(model):
        if isinstance(tensor, FakeTensor):
            return tensor.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_step(model: nn.Module, tasks: Sequence[Task], mode: FakeTensorMode) -> FakeStep:
    """A fake copy of ``model`` and ``tasks`` under ``mode``; the originals are not touched."""
    memo: dict[int, object] = {}
    for tensor in _tensors(model):
        memo[id(tensor)] = _fake(tensor, mode)
    fake_model = copy.deepcopy(model, memo)
    step = FakeStep(mode, fake_model, [])

    def convert(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = _fake(value, mode)
                if not isinstance(value, FakeTensor):
                    step.batch_values.append((memo[id(value)], value))
            return memo[id(value)]
        if isinstance(value, dict):
            return type(value)((k, convert(v)) for k, v in value.items())
        if isinstance(value, tuple | list):
            return type(value)(convert(v) for v in value)
        return value

    step.tasks = [Task(convert(t.support), convert(t.query), t.loss_fn) for t in tasks]
    return step


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _fake(tensor: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    if isinstance(tensor, FakeTensor):  # a fresh fake, so that one traced step leaves nothing to the next
        if tensor.fake_mode is not mode:
            raise ValueError(
                "the model's tensors come from two different FakeTensorModes; build it under one."
            )
        with mode:
            fake = torch.empty_like(tensor)
    else:
        fake = mode.from_tensor(tensor, static_shapes=True)
    if isinstance(tensor, nn.Parameter) and not isinstance(fake, nn.Parameter):
        fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
    return fake
