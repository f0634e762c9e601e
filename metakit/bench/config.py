"""One benchmark configuration: what a worker process measures, as a small JSON-able value."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["MEASURED", "UNSOLVED", "Config"]

#: The status of a measured configuration whose implicit gradient is not trustworthy: its inner problem
#: or its linear solve stopped above the strategy's own ``residual_tol``.
UNSOLVED = "unsolved"

#: Statuses of configurations that were measured (time, memory, fidelity); any other status failed.
MEASURED = ("ok", UNSOLVED)


@dataclass(frozen=True)
class Config:
    """A (workload, strategy, inner steps) cell of the grid and how to measure it.

    Attributes:
        workload: a name in `metakit.bench.workloads.WORKLOADS`.
        strategy: a canonical name in `metakit.bench.strategies.STRATEGIES`.
        steps: inner steps S.
        device: ``"cpu"`` or ``"cuda"``.
        repeats: timed meta-steps after the warm-up step; the median is reported.
        reference: also run the hand-written loop (SecondOrder and FirstOrder only): its gradient,
            saved bytes and time, for metakit's overhead ratio.
        outcome_steps: meta-training budget for the outcome measurement (0: skip; sine only).
        proximal_reference: for Implicit, also compute the proximal problem's exact gradient (costly;
            computed once per workload and run, shared by its S values).
        threads: ``torch.set_num_threads`` in the worker (and OMP/MKL threads).
        memory_limit_gib: cap on the worker's address-space growth on CPU (0: none), so a
            configuration that needs too much memory fails alone instead of starving the machine.
        grad_path: where the worker saves the meta-gradient for the fidelity comparison.
    """

    workload: str
    strategy: str
    steps: int
    device: str = "cpu"
    repeats: int = 3
    reference: bool = True
    outcome_steps: int = 0
    proximal_reference: bool = True
    threads: int = 1
    memory_limit_gib: float = 0.0
    grad_path: str = ""

    @property
    def key(self) -> str:
        """A file-name-safe identifier, unique within a run."""
        return f"{self.workload}__{self.strategy}__S{self.steps}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))
