"""Distributed: a meta-batch split across the ranks of a ``torch.distributed`` process group.

A meta-batch is parallel over its tasks. Each rank runs its share of the tasks with a local executor
(`Sequential` by default), exactly as one process would, and one
all-reduce of the summed meta-gradients gives the mean over *all* tasks. No DDP wrapper is involved,
so every strategy works, exact second order included.

Launch with ``torchrun --nproc_per_node=N script.py``; every rank builds the same model (same seed)
and passes the *same* meta-batch to ``meta_step`` (e.g. a task sampler with the same seed on every
rank); each rank then computes only its own tasks. See the README section "Scale out".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from metakit.capabilities import Capabilities
from metakit.executors.base import Executor, MetaBatchGradient
from metakit.executors.collectives import (
    DistributedError,
    all_gather_object,
    differing_names,
    fingerprint,
    flatten,
    pack,
    same_fingerprint,
    unflatten,
    unpack,
    wait,
)
from metakit.executors.sequential import Sequential
from metakit.problem import Strategy, TaskProblem

__all__ = ["Distributed", "DistributedError", "RankMismatchError", "rank_tasks"]

Params = dict[str, torch.Tensor]
ShareAdapted = Literal["inner_only", "all"]


class RankMismatchError(ValueError):
    """The ranks disagree on what they run: different parameters or a different meta-batch."""


def rank_tasks(n_tasks: int, rank: int, world_size: int) -> list[int]:
    """The global indices of the tasks that ``rank`` runs: ``rank, rank + W, rank + 2W, ...``.

    Strided rather than contiguous, so task 0 (whose adapted head Algorithm 1 carries over) is always
    on rank 0 and the ranks' loads differ by at most one task.
    """
    return list(range(rank, n_tasks, world_size))


class Distributed(Executor):
    """Split each meta-batch across the ranks of a process group; all-reduce the meta-gradient.

    Rank ``r`` of ``W`` runs tasks ``r, r + W, ...`` with ``local``; the sums of the meta-gradients
    (and of the MetaSGD scales' gradients) are all-reduced, and the learner divides by the global
    number of tasks, so the result is the mean over all tasks whatever ``W`` is. With more ranks than tasks the ranks without a task contribute zeros: the
    mean is still right, they only wait. Query losses, inner-loss traces and diagnostics are
    gathered in global task order on every rank (log them on rank 0). ``first_adapted`` is the
    globally first task's, broadcast from rank 0, which always runs it.

    Every rank must build the same model and call ``meta_step`` with the same tasks in the same
    order. At the first meta-step the executor compares a fingerprint of every parameter across the
    ranks and raises `RankMismatchError` naming the ranks that differ; each step it checks
    that the ranks agree on the number of tasks.

    A rank whose tasks raise does not hang the others: it reports the error in the next collective,
    the other ranks raise `DistributedError` naming it and it re-raises its own error. A rank
    that dies or stops calling ``meta_step`` makes the others raise `DistributedError` after
    ``timeout`` (every collective waits at most that long).

    Args:
        group: the process group; ``None`` for the default group. If no default group exists at the
            first meta-step and the script runs under ``torchrun`` (``WORLD_SIZE`` is set), the
            executor creates it with ``init_process_group`` (gloo for CPU tensors, nccl for CUDA
            ones) and this ``timeout``. On GPUs put each rank's model on its own device
            (``cuda:LOCAL_RANK``) before building the learner.
        local: the executor that runs this rank's tasks (``Sequential()`` by default).
        timeout: the longest any collective waits for the other ranks.
        share_adapted: which of the first task's adapted parameters every rank receives:
            ``"inner_only"`` (default; the parameters in ``inner - outer``, which
            ``MetaLearner(inner_only="first_task")`` carries over) or ``"all"`` inner parameters
            (one more broadcast of the size of the inner set).

    Example:
        >>> # torchrun --nproc_per_node=2 train.py
        >>> learner = mk.MetaLearner(..., executor=mk.executors.Distributed())  # doctest: +SKIP
        >>> result = learner.meta_step(sampler.sample(25))  # same tasks on every rank # doctest: +SKIP
    """

    def __init__(
        self,
        group: Any = None,
        local: Executor | None = None,
        timeout: timedelta | float = timedelta(minutes=5),
        share_adapted: ShareAdapted = "inner_only",
    ):
        local = local if local is not None else Sequential()
        if not isinstance(local, Executor) or isinstance(local, Distributed):
            raise TypeError(
                "Distributed(local=...) expects a single-process metakit executor such as "
                f"mk.executors.Sequential(), got {local!r}."
            )
        if isinstance(timeout, int | float) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=timeout)
        if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(
                f"Distributed(timeout=...) must be a positive datetime.timedelta or seconds, got {timeout!r}."
            )
        if share_adapted not in ("inner_only", "all"):
            raise ValueError(
                f"Distributed(share_adapted=...) must be 'inner_only' or 'all', got {share_adapted!r}."
            )
        self.group, self.local, self.timeout, self.share_adapted = group, local, timeout, share_adapted
        self._checked = False

    def __repr__(self) -> str:
        return f"Distributed(local={self.local!r}, timeout={self.timeout})"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """The local executor's: each rank runs its tasks exactly as one process would."""
        return self.local.capabilities

    # -- the meta-batch ---------------------------------------------------------------------------
    def run(self, strategy: Strategy, problems: Sequence[TaskProblem]) -> MetaBatchGradient:
        problems = list(problems)
        first = problems[0]
        self._ensure_group(first)
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        device = _device(first.partition.inner)
        if not self._checked:
            self._check_fingerprints(first, device)
            self._checked = True

        mine = rank_tasks(len(problems), rank, world)
        local, failure, record = self._run_local(strategy, [problems[i] for i in mine], mine, len(problems))
        records = self._all_gather_object(record, device, "gathering the per-task results")
        self._raise_on_failure(records, rank, failure)

        grads, lr_grads = self._summed_gradients(first, local)
        wanted = first.partition.inner_only if self.share_adapted == "inner_only" else first.start
        adapted = {
            name: local.first_adapted[name].detach().clone() if rank == 0 else torch.empty_like(value)
            for name, value in wanted.items()
        }
        self._broadcast(adapted, "broadcasting the first task's adapted parameters")
        return _combine(records, device, grads, lr_grads, adapted)

    def _run_local(
        self, strategy: Strategy, problems: list[TaskProblem], indices: list[int], n_tasks: int
    ) -> tuple[MetaBatchGradient | None, Exception | None, dict[str, Any]]:
        """This rank's tasks through the local executor; the record the other ranks receive."""
        record: dict[str, Any] = {"n_tasks": n_tasks, "error": None, "tasks": []}
        if not problems:
            return None, None, record
        try:
            local = self.local.run(strategy, problems)
        except Exception as error:  # reported to the other ranks before it is re-raised here
            record["error"] = f"{type(error).__name__}: {error}"
            return None, error, record
        record["tasks"] = [
            (
                index,
                pack(local.query_losses[k]),
                pack(local.inner_losses[k]),
                {name: pack(value[k]) for name, value in local.diagnostics.items()},
            )
            for k, index in enumerate(indices)
        ]
        return local, None, record

    def _summed_gradients(self, first: TaskProblem, local: MetaBatchGradient | None) -> tuple[Params, Params]:
        """All-reduce the ranks' sums of per-task gradients (zeros on a rank without a task)."""
        outer = {**first.partition.shared, **first.partition.outer_only}
        scales = dict(first.lr_scales or {})
        sums = _or_zeros(outer, local.grad_sums if local else {})
        lr_sums = _or_zeros(scales, local.lr_grad_sums if local else {})
        both = {**sums, **{f"lr:{name}": value for name, value in lr_sums.items()}}
        self._all_reduce(both, "all-reducing the meta-gradient")
        return {name: both[name] for name in outer}, {name: both[f"lr:{name}"] for name in scales}

    # -- process group ----------------------------------------------------------------------------
    def _ensure_group(self, problem: TaskProblem) -> None:
        if self.group is not None or dist.is_initialized():
            return
        if "WORLD_SIZE" not in os.environ:
            raise DistributedError(
                "Distributed() needs a torch.distributed process group: launch the script with "
                "`torchrun --nproc_per_node=N script.py`, or call torch.distributed.init_process_group(...) "
                "before the first meta_step (or pass group=...)."
            )
        cuda = _device(problem.partition.inner).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=self.timeout)

    def _wait(self, work: Any, what: str) -> None:
        wait(work, what, group=self.group, timeout=self.timeout)

    def _all_reduce(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        for names, flat in flatten(tensors):
            self._wait(dist.all_reduce(flat, group=self.group, async_op=True), what)
            unflatten(tensors, names, flat)

    def _broadcast(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for names, flat in flatten(tensors):
            self._wait(dist.broadcast(flat, src=source, group=self.group, async_op=True), what)
            unflatten(tensors, names, flat)

    def _all_gather_object(self, obj: Any, device: torch.device, what: str) -> list[Any]:
        return all_gather_object(obj, what, group=self.group, timeout=self.timeout, device=device)

    # -- checks -----------------------------------------------------------------------------------
    def _check_fingerprints(self, problem: TaskProblem, device: torch.device) -> None:
        params = {**problem.partition.inner, **problem.partition.outer_only, **problem.partition.frozen}
        params.update({f"lr_scale:{n}": v for n, v in (problem.lr_scales or {}).items()})
        mine = fingerprint(params)
        prints = self._all_gather_object(mine, device, "comparing the ranks' parameters")
        reference = prints[0]
        differing = [r for r, other in enumerate(prints) if not same_fingerprint(reference, other)]
        if differing:
            names = differing_names(reference, prints[differing[0]])
            raise RankMismatchError(
                f"The ranks start from different parameters: rank(s) {differing} differ from rank 0 "
                f"(e.g. in {names[:3]}). Build the model identically on every rank (the same seed, or load "
                "the same checkpoint on every rank) before the first meta_step."
            )

    def _raise_on_failure(self, records: list[dict], rank: int, failure: BaseException | None) -> None:
        failed = {r: rec["error"] for r, rec in enumerate(records) if rec["error"] is not None}
        if failure is not None:
            raise failure
        if failed:
            details = "; ".join(f"rank {r}: {message}" for r, message in failed.items())
            raise DistributedError(
                f"meta_step failed on rank(s) {sorted(failed)} (rank {rank} stops too): {details}",
                failed_ranks=sorted(failed),
            )
        counts = [rec["n_tasks"] for rec in records]
        if len(set(counts)) > 1:
            raise RankMismatchError(
                f"The ranks passed meta-batches of different sizes to meta_step: {counts} tasks on ranks "
                f"0..{len(counts) - 1}. Every rank must pass the same tasks in the same order (e.g. a task "
                "sampler with the same seed on every rank); each rank runs only its share."
            )


def _device(params: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


def _or_zeros(like: Mapping[str, torch.Tensor], sums: Mapping[str, torch.Tensor]) -> Params:
    return {
        name: sums[name].detach() if name in sums else torch.zeros_like(value) for name, value in like.items()
    }


def _combine(
    records: list[dict], device: torch.device, grads: Params, lr_grads: Params, adapted: Params
) -> MetaBatchGradient:
    tasks = sorted((t for rec in records for t in rec["tasks"]), key=lambda t: t[0])
    diagnostics = [t[3] for t in tasks]
    names = [n for n in diagnostics[0] if all(n in d for d in diagnostics)]
    return MetaBatchGradient(
        grad_sums=grads,
        lr_grad_sums=lr_grads,
        n_tasks=len(tasks),
        query_losses=torch.stack([unpack(t[1], device) for t in tasks]),
        inner_losses=torch.stack([unpack(t[2], device) for t in tasks]),
        first_adapted=adapted,
        diagnostics={n: torch.stack([unpack(d[n], device) for d in diagnostics]) for n in names},
    )
