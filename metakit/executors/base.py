"""The executor contract: what runs a meta-batch, and the per-task records and sums it returns."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from metakit.capabilities import Capabilities
from metakit.problem import Strategy, TaskGradient, TaskProblem

__all__ = ["Executor", "MetaBatchGradient", "accumulate", "records_of"]

Params = dict[str, torch.Tensor]


@dataclass
class MetaBatchGradient:
    """What an executor returns for one meta-batch: sums over the tasks and per-task records.

    The learner forms the mean (``grad_sums / n_tasks``) and carries Algorithm 1's head over.

    Attributes:
        grad_sums: the sum of the tasks' meta-gradients, by outer parameter name (detached).
        lr_grad_sums: the sum of the MetaSGD scales' meta-gradients, by inner parameter name.
        n_tasks: the number of tasks in the meta-batch (on every rank, under ``Distributed``).
        query_losses: each task's query loss, ``[n_tasks]``.
        inner_losses: each task's support-loss trace, ``[n_tasks, steps + 1]``.
        first_adapted: the first task's adapted inner parameters.
        diagnostics: per-task measurements by name, each ``[n_tasks]``.
    """

    grad_sums: Params
    lr_grad_sums: Params
    n_tasks: int
    query_losses: torch.Tensor
    inner_losses: torch.Tensor
    first_adapted: Params
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


class Executor(abc.ABC):
    """Runs a strategy over a meta-batch of task problems.

    An executor declares what it supports in `capabilities`; the learner checks a
    combination against it (`metakit.capabilities.check_composition`) before the first step.
    """

    capabilities = Capabilities(functional=False)

    @abc.abstractmethod
    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        """The summed meta-gradient of ``problems`` under ``strategy``, with the per-task records."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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


def records_of(total: Params, total_lr: Params, outcomes: Sequence[TaskGradient]) -> MetaBatchGradient:
    """A `MetaBatchGradient` from summed gradients and the per-task outcomes."""
    names = [name for name in outcomes[0].diagnostics if all(name in o.diagnostics for o in outcomes)]
    return MetaBatchGradient(
        grad_sums=total,
        lr_grad_sums=total_lr,
        n_tasks=len(outcomes),
        query_losses=torch.stack([o.query_loss.detach() for o in outcomes]),
        inner_losses=torch.stack([o.inner_losses for o in outcomes]),
        first_adapted=outcomes[0].adapted,
        diagnostics={
            name: torch.stack([torch.as_tensor(o.diagnostics[name]).detach() for o in outcomes])
            for name in names
        },
    )
