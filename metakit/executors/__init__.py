"""Executors: where the tasks of a meta-batch run.

An executor turns a meta-batch of `TaskProblem` into a
`MetaBatchGradient`: the sums of the tasks' meta-gradients and their per-task records (query
losses, inner-loss traces, diagnostics, the first task's adapted parameters). The learner forms the
mean. The meta-gradient is the same whichever executor runs it; what each supports is declared in
its ``capabilities``.

- `Sequential` (default): one task after another, each task's graph freed before the next.
- `Vmap`: tasks of equal shapes batched with ``torch.func.vmap``.
- `Distributed`: the meta-batch split across the ranks of a ``torch.distributed`` process group.
"""

from metakit.executors.base import Executor, MetaBatchGradient
from metakit.executors.collectives import DistributedError
from metakit.executors.distributed import Distributed, RankMismatchError, rank_tasks
from metakit.executors.sequential import Sequential
from metakit.executors.vmap import Vmap, VmapError

__all__ = [
    "Distributed",
    "DistributedError",
    "Executor",
    "MetaBatchGradient",
    "RankMismatchError",
    "Sequential",
    "Vmap",
    "VmapError",
    "rank_tasks",
]
