"""Executors: where the tasks of a meta-batch run.

An executor turns a meta-batch of :class:`~metakit.problem.TaskProblem` into one
:class:`MetaBatchGradient`: the mean meta-gradient over the tasks, their query losses, inner-loss
traces and diagnostics, and the first task's adapted parameters. The meta-gradient is the same
whichever executor runs it.

- :class:`Sequential` (default): one task after another, each task's graph freed before the next.
- :class:`~metakit.vmap.Vmap`: tasks of equal shapes batched with ``torch.func.vmap``.
- ``Distributed``: the meta-batch split across the ranks of a ``torch.distributed`` process group.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from metakit.problem import Strategy, TaskGradient, TaskProblem

__all__ = [
    "Distributed",
    "DistributedError",
    "Executor",
    "MetaBatchGradient",
    "RankMismatchError",
    "Sequential",
    "Vmap",
    "VmapError",
]

Params = dict[str, torch.Tensor]


@dataclass
class MetaBatchGradient:
    """What an executor returns for one meta-batch.

    Attributes:
        grads: mean meta-gradient over all tasks, by outer parameter name (detached).
        lr_grads: mean meta-gradient of the MetaSGD scales, by inner parameter name.
        query_losses: each task's query loss, ``[n_tasks]``.
        inner_losses: each task's support-loss trace, ``[n_tasks, steps + 1]``.
        first_adapted: the first task's adapted inner parameters (Algorithm 1's head carry-over).
        diagnostics: per-task measurements by name, each ``[n_tasks]``.
    """

    grads: Params
    lr_grads: Params
    query_losses: torch.Tensor
    inner_losses: torch.Tensor
    first_adapted: Params
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Executor(abc.ABC):
    """Runs a strategy over a meta-batch of task problems."""

    @abc.abstractmethod
    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        """The mean meta-gradient of ``problems`` under ``strategy``, with the per-task measurements."""

    def check(self, strategy: Strategy) -> None:  # noqa: B027 - optional hook
        """Raise a clear error if this executor cannot run ``strategy`` (called when the learner is built)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Executor):
    """One task after another; each task's graph is freed before the next one starts.

    Example:
        >>> learner = mk.MetaLearner(..., executor=mk.executors.Sequential())  # doctest: +SKIP
    """

    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        total: Params = {}
        total_lr: Params = {}
        outcomes: list[TaskGradient] = []
        for problem in problems:
            outcome = self.task_gradient(strategy, problem)
            accumulate(total, outcome.grads)
            accumulate(total_lr, outcome.lr_grads)
            outcome.grads = outcome.lr_grads = {}
            outcomes.append(outcome)
        n_tasks = len(problems)
        return combine_outcomes(mean_over(total, n_tasks), mean_over(total_lr, n_tasks), outcomes)

    def task_gradient(self, strategy: Strategy, problem: TaskProblem) -> TaskGradient:
        """One task's outcome; a subclass may wrap it (e.g. run each task in its own random stream)."""
        return strategy.task_gradient(problem)


def accumulate(total: Params, grads: Mapping[str, torch.Tensor]) -> None:
    """``total += grads``, by name, detached; the first contribution is taken over, not copied.

    Strategies return fresh gradient tensors that nothing else holds, so summing into them in place
    is safe and saves one allocation per parameter and task.
    """
    for name, grad in grads.items():
        grad = grad.detach()
        if name in total:
            total[name].add_(grad)
        else:
            total[name] = grad if grad.is_floating_point() else grad.clone()


def mean_over(total: Params, n_tasks: int) -> Params:
    """``total / n_tasks``, by name."""
    return {name: value.div_(n_tasks) for name, value in total.items()}


def combine_outcomes(total: Params, total_lr: Params, outcomes: Sequence[TaskGradient]) -> MetaBatchGradient:
    """A :class:`MetaBatchGradient` from summed gradients and the per-task outcomes."""
    names = [name for name in outcomes[0].diagnostics if all(name in o.diagnostics for o in outcomes)]
    return MetaBatchGradient(
        grads=total,
        lr_grads=total_lr,
        query_losses=torch.stack([o.query_loss.detach() for o in outcomes]),
        inner_losses=torch.stack([o.inner_losses for o in outcomes]),
        first_adapted=outcomes[0].adapted,
        diagnostics={
            name: torch.stack([torch.as_tensor(o.diagnostics[name]).detach() for o in outcomes])
            for name in names
        },
    )


# Vmap lives in its own module (the per-task computation written with torch.func); exported here.
from metakit.distributed import Distributed, DistributedError, RankMismatchError  # noqa: E402
from metakit.vmap import Vmap, VmapError  # noqa: E402
