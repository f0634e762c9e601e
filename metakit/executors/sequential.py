"""The ``Sequential`` executor: one task after another."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metakit.executors.base import Executor, MetaBatchGradient, accumulate, records_of
from metakit.problem import Strategy, TaskGradient, TaskProblem

__all__ = ["Sequential"]


class Sequential(Executor):
    """One task after another; each task's graph is freed before the next one starts.

    Example:
        >>> learner = mk.MetaLearner(..., executor=mk.executors.Sequential())  # doctest: +SKIP
    """

    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        total: dict[str, torch.Tensor] = {}
        total_lr: dict[str, torch.Tensor] = {}
        outcomes: list[TaskGradient] = []
        for problem in problems:
            outcome = problem.measured(self.task_gradient(strategy, problem))
            accumulate(total, outcome.grads)
            accumulate(total_lr, outcome.lr_grads)
            outcome.grads = outcome.lr_grads = {}
            outcomes.append(outcome)
        return records_of(total, total_lr, outcomes)

    def task_gradient(self, strategy: Strategy, problem: TaskProblem) -> TaskGradient:
        """One task's outcome; a subclass may wrap it (e.g. run each task in its own random stream)."""
        return strategy.task_gradient(problem)
