"""The ``Vmap`` executor: the tasks of a meta-batch batched with ``torch.func.vmap``.

Many small tasks (sine regression, few-shot heads) spend most of their time in Python and in tiny
kernels, one task after another. ``Vmap`` runs the whole per-task computation — the inner loop, the
query loss and its meta-gradient, written with ``torch.func`` — once over a stacked batch of tasks.
It computes the same meta-gradient as `Sequential`; it pays for small
models and many tasks, and not for a large model, whose kernels are already big (and whose memory it
multiplies by the number of tasks in a chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import optree
import torch

from metakit.capabilities import Capabilities
from metakit.executors.base import Executor, MetaBatchGradient
from metakit.problem import Partition, Strategy, TaskProblem
from metakit.step import check_finite_trace, detached
from metakit.task import Task

__all__ = ["Vmap", "VmapError"]


class VmapError(ValueError):
    """The meta-batch or the model cannot be batched with ``torch.func.vmap``."""


class Vmap(Executor):
    """Tasks of equal shapes batched with ``torch.func.vmap``: the same meta-gradient, less overhead.

    Runs every strategy that declares a ``torch.func`` form (``capabilities.functional``):
    `SecondOrder` (every ``hvp``/``checkpoint`` setting computes the same exact gradient;
    under ``vmap`` it is formed reverse over reverse), `FirstOrder`,
    `Truncated` and `Reptile`, with MetaSGD scales, ``inner_only``,
    a feature-reuse cut and the ``"task"`` and ``"frozen"`` buffer policies. The strategy's own
    ``task_gradient`` runs once per task inside the vmapped function.

    Args:
        chunk_size: tasks per vmapped chunk (``None``: all at once); lower it to bound memory.

    Example:
        >>> learner = mk.MetaLearner(..., executor=mk.executors.Vmap())  # doctest: +SKIP
    """

    capabilities = Capabilities(
        functional=True, loss_scaling=False, in_place_buffers=False, autocast_batch_norm=False
    )

    def __init__(self, chunk_size: int | None = None):
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"Vmap(chunk_size=...) must be None or an int >= 1 (tasks per chunk), got {chunk_size!r}."
            )
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"Vmap(chunk_size={self.chunk_size})" if self.chunk_size is not None else "Vmap()"

    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        first = problems[0]
        if any(p.loss_fn is not first.loss_fn for p in problems):
            raise VmapError(
                "Vmap() needs one loss function for the whole meta-batch, but the tasks carry different "
                "ones (Task(loss_fn=...)). Use executors.Sequential() for mixed tasks."
            )
        supports = _stack([p.task.support for p in problems], "support")
        queries = _stack([p.task.query for p in problems], "query")
        partition = first.partition
        values = Partition(
            shared=detached(partition.shared),
            inner_only=detached(partition.inner_only),
            outer_only=detached(partition.outer_only),
            frozen=detached(partition.frozen),
        )
        scales = detached(first.lr_scales) if first.lr_scales else None

        def one_task(support: Any, query: Any):
            problem = dataclasses.replace(
                first,
                task=Task(support, query, first.task.loss_fn),
                partition=values,
                lr_scales=scales,
                functional=True,
                batched_like=_zero_of(support),
            )
            outcome = problem.measured(strategy.task_gradient(problem))
            return (
                outcome.grads,
                outcome.lr_grads,
                outcome.query_loss,
                outcome.inner_losses,
                detached(outcome.adapted),
                outcome.diagnostics,
            )

        try:
            batched = torch.func.vmap(one_task, chunk_size=self.chunk_size, randomness="different")
            grads, lr_grads, query_losses, traces, adapted, diagnostics = batched(supports, queries)
        except VmapError:
            raise
        except (RuntimeError, NotImplementedError, ValueError) as error:
            raise _vmap_error(error) from error
        for index, trace in enumerate(traces):
            check_finite_trace(trace if first.trace_final else trace[:-1], index, has_final=first.trace_final)
        return MetaBatchGradient(
            grad_sums={name: g.sum(0) for name, g in grads.items()},
            lr_grad_sums={name: g.sum(0) for name, g in lr_grads.items()},
            n_tasks=len(problems),
            query_losses=query_losses.detach(),
            inner_losses=traces.detach(),
            first_adapted={name: value[0].detach() for name, value in adapted.items()},
            diagnostics={name: value.detach() for name, value in diagnostics.items()},
        )


def _vmap_error(error: BaseException) -> VmapError:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "in-place" in first_line or "inplace" in first_line or "mutate" in first_line:
        cause = (
            "a forward writes to a tensor shared by the tasks in place (a buffer updated by a custom module, "
            "for example). Use InnerLoop(buffers='task') or 'frozen' for BatchNorm-like statistics, keep such "
            "state outside the module"
        )
    else:
        cause = "the model or loss has data-dependent control flow or .item() calls, which vmap cannot batch"
    return VmapError(
        f"torch.func.vmap could not batch this meta-batch ({type(error).__name__}: {first_line}): {cause}; "
        "or use executors.Sequential()."
    )


def _zero_of(batch: Any) -> torch.Tensor:
    """A zero that carries the task's batch dimension under vmap (a float scalar of the batch)."""
    leaf = optree.tree_leaves(batch)[0]
    return (leaf.flatten()[0].detach() * 0).to(torch.float32 if not leaf.is_floating_point() else leaf.dtype)


def _stack(batches: Sequence[Any], which: str) -> Any:
    """Stack the tasks' batches leaf by leaf; a clear error when their shapes differ."""
    leaves = [optree.tree_flatten(batch) for batch in batches]
    spec = leaves[0][1]
    for index, (_values, other) in enumerate(leaves):
        if other != spec:
            raise VmapError(
                f"Vmap() needs every task's {which} batch to have the same structure; task {index}'s differs "
                f"from task 0's. Use executors.Sequential()."
            )
    stacked = []
    for position, first in enumerate(leaves[0][0]):
        values = [entry[0][position] for entry in leaves]
        if not isinstance(first, torch.Tensor):
            raise VmapError(
                f"Vmap() can only stack tensors; the {which} batch holds a {type(first).__name__}."
            )
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) > 1:
            by_task = [tuple(value.shape) for value in values]
            raise VmapError(
                f"Vmap() needs tasks of equal shapes, but the {which} batches have shapes {by_task[:6]}"
                f"{' ...' if len(by_task) > 6 else ''}. Pad them to one shape (with a mask or ignored labels) "
                "or use executors.Sequential()."
            )
        stacked.append(torch.stack(values))
    return optree.tree_unflatten(spec, stacked)
