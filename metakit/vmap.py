"""The ``Vmap`` executor: the tasks of a meta-batch batched with ``torch.func.vmap``.

Many small tasks (sine regression, few-shot heads) spend most of their time in Python and in tiny
kernels, one task after another. ``Vmap`` runs the whole per-task computation — the inner loop, the
query loss and its meta-gradient, written with ``torch.func`` — once over a stacked batch of tasks.
It computes the same meta-gradient as :class:`~metakit.executors.Sequential`; it pays for small
models and many tasks, and not for a large model, whose kernels are already big (and whose memory it
multiplies by the number of tasks in a chunk).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch

from metakit.executors import Executor, MetaBatchGradient
from metakit.functional import double_backward_safe
from metakit.inner import check_finite_trace
from metakit.problem import Strategy, TaskProblem
from metakit.strategies import FirstOrder, Reptile, SecondOrder, Truncated

__all__ = ["Vmap", "VmapError"]

Params = dict[str, torch.Tensor]


class VmapError(ValueError):
    """The meta-batch, the strategy or the model cannot be batched with ``torch.func.vmap``."""


class Vmap(Executor):
    """Tasks of equal shapes batched with ``torch.func.vmap``: the same meta-gradient, less overhead.

    Supports :class:`SecondOrder` (every ``hvp``/``checkpoint`` setting computes the same exact gradient;
    under ``vmap`` it is formed reverse over reverse), :class:`FirstOrder`, :class:`Truncated` and
    :class:`Reptile`, with MetaSGD scales and ``inner_only``. A learner's feature-reuse cut is not used
    (the whole model runs in every step; the gradient is the same).

    Args:
        chunk_size: tasks per vmapped chunk (``None``: all at once); lower it to bound memory.

    Example:
        >>> learner = mk.MetaLearner(..., executor=mk.executors.Vmap())  # doctest: +SKIP
    """

    SUPPORTED = (SecondOrder, FirstOrder, Truncated, Reptile)

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

    def check(self, strategy: Strategy) -> None:
        if type(strategy) not in self.SUPPORTED:
            raise VmapError(
                f"Vmap() batches SecondOrder, FirstOrder, Truncated and Reptile; {strategy!r} has its own "
                "backward pass (Implicit's conjugate-gradient solve, or a custom strategy) that cannot run "
                "under torch.func.vmap. Use executors.Sequential()."
            )

    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        self.check(strategy)
        first = problems[0]
        if any(p.loss_fn is not first.loss_fn for p in problems):
            raise VmapError(
                "Vmap() needs one loss function for the whole meta-batch, but the tasks carry different "
                "ones (Task(loss_fn=...)). Use executors.Sequential() for mixed tasks."
            )
        supports = _stack([p.task.support for p in problems], "support")
        queries = _stack([p.task.query for p in problems], "query")
        steps = first.inner.steps
        reptile = isinstance(strategy, Reptile)
        differentiable = 0 if reptile else strategy.differentiable_steps(steps)  # type: ignore[attr-defined]
        per_task = _PerTask(first, differentiable, reptile=isinstance(strategy, Reptile))
        partition = first.partition
        shared = {n: v.detach() for n, v in partition.shared.items()}
        outer_only = {n: v.detach() for n, v in partition.outer_only.items()}
        lr = {n: v.detach() for n, v in (first.lr_scales or {}).items()}
        inner_only = {n: v.detach() for n, v in partition.inner_only.items()}
        frozen = {n: v.detach() for n, v in partition.frozen.items()}

        def one_task(support: Any, query: Any):
            return per_task(shared, outer_only, lr, inner_only, frozen, support, query)

        try:
            batched = torch.func.vmap(one_task, chunk_size=self.chunk_size, randomness="different")
            grads, lr_grads, query_losses, traces, adapted = batched(supports, queries)
        except VmapError:
            raise
        except (RuntimeError, NotImplementedError, ValueError) as error:
            raise VmapError(
                f"torch.func.vmap could not batch this model or loss ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}). Models with data-dependent control flow or .item() calls "
                "cannot be vmapped; use executors.Sequential()."
            ) from error
        n_tasks = len(problems)
        for index, trace in enumerate(traces):
            check_finite_trace(trace if first.trace_final else trace[:-1], index, has_final=first.trace_final)
        return MetaBatchGradient(
            grads={name: g.sum(0) / n_tasks for name, g in grads.items()},
            lr_grads={name: g.sum(0) / n_tasks for name, g in lr_grads.items()},
            query_losses=query_losses.detach(),
            inner_losses=traces.detach(),
            first_adapted={name: value[0].detach() for name, value in adapted.items()},
        )


class _PerTask:
    """One task's meta-gradient written with ``torch.func``, so that it can be vmapped."""

    def __init__(self, problem: TaskProblem, differentiable_steps: int, reptile: bool):
        self.inner, self.objective = problem.inner, problem.objective
        self.steps = problem.inner.steps
        self.first_differentiable = self.steps - min(differentiable_steps, self.steps)
        self.reptile, self.trace_final = reptile, problem.trace_final

    def __call__(self, shared, outer_only, lr, inner_only, frozen, support, query):
        if self.reptile:
            adapted, trace = self._adapt(shared, outer_only, lr, inner_only, frozen, support)
            query_loss = self.objective({**frozen, **outer_only, **adapted}, query)
            grads = {name: shared[name] - adapted[name] for name in shared}
            return grads, {}, query_loss, trace, adapted

        def meta_loss(shared, outer_only, lr):
            adapted, trace = self._adapt(shared, outer_only, lr, inner_only, frozen, support)
            with double_backward_safe():
                loss = self.objective({**frozen, **outer_only, **adapted}, query)
            return loss, (trace, adapted)

        argnums = (0, 1, 2) if lr else (0, 1)
        args = (shared, outer_only, lr)
        grads, (query_loss, (trace, adapted)) = _grad_and_value(meta_loss, argnums, args)
        by_name = {**grads[0], **grads[1]}
        lr_grads = grads[2] if lr else {}
        return by_name, lr_grads, query_loss, trace, {n: v.detach() for n, v in adapted.items()}

    def _adapt(self, shared, outer_only, lr, inner_only, frozen, support) -> tuple[Params, torch.Tensor]:
        params = {**shared, **inner_only}
        state = _batched_like(self.inner.init(params), support)
        losses = []
        for step in range(self.steps):
            differentiable = step >= self.first_differentiable
            if step == self.first_differentiable:
                # The steps before the differentiated segment count as identity for shared parameters.
                params = {
                    name: shared[name] + (value - shared[name]).detach() if name in shared else value.detach()
                    for name, value in params.items()
                }
            context = {**frozen, **(outer_only if differentiable else _detach(outer_only))}
            inputs = params if differentiable else _detach(params)

            def support_loss(inner: Params, context: Params = context) -> torch.Tensor:
                return self.objective({**context, **inner}, support)

            with double_backward_safe(differentiable):
                grads, loss = torch.func.grad_and_value(support_loss)(inputs)
            if not differentiable:
                grads = _detach(grads)
            params, state = self.inner.update(
                grads, state, inputs, (lr if differentiable else _detach(lr)) or None
            )
            if not differentiable:
                params = _detach(params)
            losses.append(loss.detach())
        if self.first_differentiable == self.steps:
            params = {
                name: shared[name] + (value - shared[name]).detach() if name in shared else value.detach()
                for name, value in params.items()
            }
        if self.trace_final:
            losses.append(
                self.objective({**frozen, **_detach(outer_only), **_detach(params)}, support).detach()
            )
        else:
            losses.append(torch.full_like(losses[0], float("nan")))
        return params, torch.stack(losses)


def _batched_like(state: Any, batch: Any) -> Any:
    """``state`` with its float tensors made per-task (an exact ``+ 0`` from the batch) under vmap.

    TorchOpt's updates write some results in place (``trace.mul(m).add_(g)``), which vmap refuses when
    the state is shared by the tasks while the gradient is per task.
    """
    leaf = optree.tree_leaves(batch)[0]
    zero = leaf.flatten()[0].detach() * 0

    def batched(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value + zero.to(value.dtype)
        return value

    return optree.tree_map(batched, state)


def _grad_and_value(fn, argnums, args):
    grads, value = torch.func.grad_and_value(fn, argnums=argnums, has_aux=True)(*args)
    if len(grads) == 2:
        grads = (*grads, {})
    return grads, value


def _detach(tree: Mapping[str, torch.Tensor]) -> Params:
    return {name: value.detach() for name, value in tree.items()}


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
