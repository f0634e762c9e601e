"""MAML's sinusoid regression (Finn et al., 2017): small, data-free meta-learning tasks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from metakit.task import Task

__all__ = ["SineTasks", "mse_loss", "sine_mlp"]


@dataclass
class SineTasks:
    """Sampler of sine tasks ``y = A sin(x - phase)`` with K support and K query points.

    Amplitude is uniform in ``amplitude``, phase in ``phase``, inputs in ``x_range`` (the paper's
    defaults). A fixed ``seed`` makes the sequence of task batches reproducible.
    """

    k_shot: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.k_shot < 1 or self.k_query < 1:
            raise ValueError(
                f"SineTasks needs k_shot >= 1 and k_query >= 1, got {self.k_shot}, {self.k_query}."
            )
        self._generator = torch.Generator().manual_seed(self.seed)

    def _uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self._generator, dtype=self.dtype)

    def sample(self, n_tasks: int) -> list[Task]:
        """Draw ``n_tasks`` tasks; each batch is ``(x, y)`` with shapes ``[K, 1]``."""
        tasks = []
        for _ in range(n_tasks):
            amplitude = self._uniform(*self.amplitude, 1)
            phase = self._uniform(*self.phase, 1)
            x = self._uniform(*self.x_range, self.k_shot + self.k_query, 1)
            y = amplitude * torch.sin(x - phase)
            tasks.append(
                Task(support=(x[: self.k_shot], y[: self.k_shot]), query=(x[self.k_shot :], y[self.k_shot :]))
            )
        return tasks


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def sine_mlp(hidden: int = 40, depth: int = 2, activation: str = "relu") -> nn.Sequential:
    """The 1-40-40-1 ReLU MLP of MAML's sinusoid experiment.

    ``activation="tanh"`` gives a smooth network, whose inner problem gradient descent can solve to a
    tolerance (what `Implicit` needs; ReLU kinks stall it).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"sine_mlp(activation=...) must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
        )
    layers: list[nn.Module] = []
    width = 1
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mse_loss(forward, batch) -> torch.Tensor:
    """Mean squared error of ``forward(x)`` against ``y`` for a batch ``(x, y)``."""
    x, y = batch
    # Written out rather than F.mse_loss: the forward-mode derivative of mse_loss_backward fails in
    # PyTorch ("ZeroTensors are immutable"), which SecondOrder(hvp="forward") needs.
    return ((forward(x) - y) ** 2).mean()
