"""The processes of a run launched with ``torchrun``: which rank does what, and where they meet.

``torchrun --nproc_per_node=N -m metakit.cli ner run ...`` starts N processes that run the same loop:

- every rank loads the data and the model and checks the same (resumed) state;
- meta priming splits each meta-batch across the ranks (`Distributed`,
  gloo); fine-tuning priming (setting 5, no meta-gradient) runs on every rank alike, so every rank
  holds the same primed model without waiting for one;
- the fine-tuning units of a (setting, seed) are split across the ranks, target by target
  (``targets[rank::N]``); each unit's outcome (F1, predictions, logged scalars) reaches rank 0 at
  the end of the (setting, seed);
- rank 0 alone writes the output folder: the lock, checkpoints, TensorBoard logs, unit files,
  ``results.json`` and the table.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) `Ranks` is one process and none of
this applies: a run is exactly what it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metakit.executors import Distributed, Sequential
from metakit.executors.collectives import DistributedError, all_gather_object
from metakit.problem import Strategy, TaskGradient, TaskProblem

__all__ = ["Failure", "Ranks", "ScalarRecorder", "TaskStreams", "task_seed"]

#: How long a rank waits for the others at any meeting point, unless ``--timeout`` says otherwise.
DEFAULT_TIMEOUT = timedelta(minutes=30)


def task_seed(seed: int, step: int, index: int) -> int:
    """The seed of task ``index``'s random stream at meta-step ``step`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TaskStreams(Sequential):
    """Sequential, but each task draws its dropout masks from its own random stream.

    A task's stream is seeded by (run seed, meta-step, the task's place in the meta-batch), so what a
    task computes does not depend on which rank runs it or on the tasks before it: a meta-step's
    gradient is the same on 1 or N processes (up to the order of the float sums). The process's own
    random state is left as it was.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int):
        self.seed, self.step = seed, 0

    def __repr__(self) -> str:
        return f"TaskStreams(seed={self.seed})"

    def task_gradient(self, strategy: Strategy, problem: TaskProblem) -> TaskGradient:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(task_seed(self.seed, self.step, problem.index))
            return strategy.task_gradient(problem)


@dataclass
class Failure:
    """What a rank reports at a meeting point about an error of its own."""

    rank: int
    kind: str
    message: str
    floating_point: bool

    @classmethod
    def of(cls, rank: int, error: BaseException) -> Failure:
        return cls(rank, type(error).__name__, str(error), isinstance(error, FloatingPointError))


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world``; a single process without ``torchrun``.

    Args:
        rank, world: this process's rank and the number of processes.
        timeout: the longest a rank waits for the others at a meeting point or in a meta-step.
        launched: whether the run was started by ``torchrun`` (``WORLD_SIZE`` in the environment).

    Example:
        >>> ranks = Ranks.from_environment(timedelta(minutes=30))  # doctest: +SKIP
        >>> ranks.main  # rank 0: the one that writes  # doctest: +SKIP
    """

    rank: int = 0
    world: int = 1
    timeout: timedelta = DEFAULT_TIMEOUT
    launched: bool = False
    created_group: bool = field(default=False, repr=False)

    @classmethod
    def from_environment(cls, timeout: timedelta = DEFAULT_TIMEOUT) -> Ranks:
        """Join ``torchrun``'s process group (gloo) if ``WORLD_SIZE`` is set; else one process."""
        if "WORLD_SIZE" not in os.environ:
            return cls(timeout=timeout)
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), timeout, launched=True, created_group=created)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes the output folder."""
        return self.rank == 0

    def mine(self, items: list) -> list:
        """This rank's share of ``items``: ``items[rank::world]``."""
        return items[self.rank :: self.world]

    def executor(self, seed: int) -> TaskStreams | Distributed | None:
        """The executor of meta priming: ``None`` (the learner's default) for one plain process."""
        if not self.launched:
            return None
        return Distributed(local=TaskStreams(seed), timeout=self.timeout)

    def share(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order (waits at most ``timeout`` for the others)."""
        if not self.launched:
            return [obj]
        return all_gather_object(obj, what, timeout=self.timeout)

    def meet(self, error: BaseException | None, what: str, payload: Any = None) -> tuple[list, list[Failure]]:
        """A meeting point: every rank's ``payload`` and the errors the ranks bring, in rank order.

        A rank whose collective timed out (a rank died or hung) does not meet again: it re-raises.
        """
        if isinstance(error, DistributedError) and not error.failed_ranks:
            raise error
        own = Failure.of(self.rank, error) if error is not None and not _reports_others(error) else None
        shared = self.share((own, payload), what)
        return [p for _, p in shared], [f for f, _ in shared if f is not None]

    def raise_failures(self, error: BaseException | None, failures: list[Failure]) -> None:
        """Re-raise this rank's own error, or raise one naming the ranks that failed."""
        if error is not None:
            raise error
        if failures:
            details = "; ".join(f"rank {f.rank}: {f.kind}: {f.message}" for f in failures)
            raise DistributedError(
                f"rank(s) {[f.rank for f in failures]} failed (rank {self.rank} stops too): {details}",
                failed_ranks=[f.rank for f in failures],
            )

    def quiet(self, error: BaseException) -> bool:
        """Whether this rank should not print ``error``: it only reports another rank's own error."""
        if isinstance(error, KeyboardInterrupt):
            return not self.main  # rank 0 says where the run stopped
        return _reports_others(error) and self.rank not in error.failed_ranks

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
            self.created_group = False


def _reports_others(error: BaseException) -> bool:
    return isinstance(error, DistributedError) and bool(error.failed_ranks)


class ScalarRecorder:
    """A stand-in for a ``SummaryWriter`` on ranks that do not write: keeps ``add_scalar`` calls."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), int(step)))

    def close(self) -> None:
        pass
