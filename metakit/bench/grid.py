"""Which configurations a run measures: the quick default, the full grid, and command-line overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metakit.bench.config import Config
from metakit.bench.strategies import EXACT_REFERENCE, names
from metakit.bench.workloads import WORKLOADS

__all__ = ["FULL", "QUICK", "GridEntry", "canonical_workload", "default_strategies", "expand"]

#: ``--workloads sweep`` stands for the size sweep (d): BERT at hidden 128, 256 and 512.
GROUPS = {"sweep": ("bert-h128", "bert", "bert-h512")}


@dataclass(frozen=True)
class GridEntry:
    """Strategies and inner-step counts measured on one workload.

    Attributes:
        outcome_steps: meta-training budget of the outcome measurement (0: none).
        outcome_at: the S values at which the outcome is measured (``None``: all).
        reference_at: the S values at which the hand-written loop is timed (``None``: all).
        proximal_reference: compute Implicit's proximal reference (where the workload affords it).
    """

    workload: str
    strategies: tuple[str, ...]
    steps: tuple[int, ...]
    outcome_steps: int = 0
    outcome_at: tuple[int, ...] | None = None
    reference_at: tuple[int, ...] | None = None
    proximal_reference: bool = True


_ALL = names(default=True)
_CORE = names(core=True)
_SWEEP = names(sweep=True)
_IMPLICIT = (EXACT_REFERENCE, *names(proximal=True, default=True))
_VMAP = ("second-order", "second-order-vmap", "first-order", "first-order-vmap")


def default_strategies(workload: str) -> tuple[str, ...]:
    """The strategies ``workload`` is compared under unless the user names others."""
    return {"all": _ALL, "core": _CORE, "sweep": _SWEEP, "implicit": _IMPLICIT}[WORKLOADS[workload].compared]


#: Peak memory from S = 2 to 16 on every workload: how SecondOrder()'s grows against the sub-linear mode's.
_GROWTH = (EXACT_REFERENCE, "second-order-forward-checkpoint-4")
_LONG = ("bert-long", "priming-long")

QUICK = (
    # Implicit's proximal reference takes minutes (thousands of Hessian-vector products): --full only.
    GridEntry("sine", default_strategies("sine"), (1, 5), outcome_steps=20, proximal_reference=False),
    # BERT's quick row keeps to the core strategies: Implicit alone would double the run's time.
    GridEntry("bert", _CORE, (1, 5), reference_at=(1,)),
    GridEntry("priming", default_strategies("priming"), (1, 5), reference_at=(1,)),
    # Activations dominate: what the memory-lean modes are for shows at S > 1.
    GridEntry("bert-long", _CORE, (1, 5), reference_at=(1,)),
)

#: The committed CPU grid (2 CPU cores, one thread per configuration): every exact mode and FirstOrder
#: at S = 1, 5, 10, 20 on sine and bert (memory against S), the other strategies on sine, priming with
#: feature reuse at S = 1, 5, 10, the activation-heavy workloads at S = 1, 5, 10, 20 (one step per
#: segment at S = 10 besides), peak memory at S = 2 and 16 on every workload, Vmap against Sequential on
#: 25 sine tasks, and Implicit where its inner problem is solved (sine-tanh). S >= 16 runs without the
#: hand-written loop (its ratio is reported at S <= 10). ``--workloads sweep`` measures the size sweep.
FULL = (
    GridEntry(
        "sine",
        tuple(n for n in default_strategies("sine") if n != "implicit"),
        (1, 5, 10),
        outcome_steps=40,
        outcome_at=(1, 5),
    ),
    GridEntry("sine", _CORE, (20,), reference_at=()),
    GridEntry("sine", _VMAP, (1, 5)),
    GridEntry("sine-tanh", (EXACT_REFERENCE, "implicit-solved"), (1, 5)),
    GridEntry("priming", _CORE, (1, 5, 10)),
    GridEntry("bert", _CORE, (1, 5, 10)),
    GridEntry("bert", _CORE, (20,), reference_at=()),
    *(GridEntry(name, _CORE, (1, 5, 10), reference_at=(1, 5)) for name in _LONG),
    *(GridEntry(name, _CORE, (20,), reference_at=()) for name in _LONG),
    GridEntry("bert-long", ("second-order-checkpoint-1",), (10,), reference_at=()),
    *(GridEntry(name, _GROWTH, (2, 16), reference_at=()) for name in ("sine", "bert", "priming", *_LONG)),
)


def canonical_workload(text: str) -> list[str]:
    """Workload names for ``text`` (a name or a group such as ``sweep``).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    name = text.strip().lower()
    if name in GROUPS:
        return list(GROUPS[name])
    if name not in WORKLOADS:
        raise ValueError(
            f"unknown workload {text!r}; valid workloads: {', '.join(WORKLOADS)} (or the group 'sweep')"
        )
    return [name]


def expand(
    base: Sequence[GridEntry],
    *,
    workloads: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    **settings,
) -> list[Config]:
    """The configurations of ``base``, in its order, optionally restricted or overridden.

    Args:
        base: the grid (`QUICK` or `FULL`).
        workloads: measure only these workloads; one that ``base`` lacks gets its own default
            strategies and ``base``'s longest list of S. ``None`` keeps ``base``'s.
        strategies: replaces every entry's strategies (a combination a learner rejects is recorded
            as ``"unsupported"``).
        steps: replaces every entry's inner-step counts.
        settings: further `Config` fields (device, repeats, threads, memory_limit_gib).
    """
    entries = list(base)
    if workloads is not None:
        default_steps = max((entry.steps for entry in base), key=len)
        present = {entry.workload for entry in entries}
        entries = [entry for entry in entries if entry.workload in workloads] + [
            GridEntry(name, default_strategies(name), default_steps)
            for name in workloads
            if name not in present
        ]
    seen: set[str] = set()
    configs = []
    for entry in entries:
        for strategy in strategies or entry.strategies:
            for s in steps or entry.steps:
                config = Config(
                    entry.workload,
                    strategy,
                    s,
                    outcome_steps=entry.outcome_steps
                    if entry.outcome_at is None or s in entry.outcome_at
                    else 0,
                    reference=entry.reference_at is None or s in entry.reference_at,
                    proximal_reference=entry.proximal_reference,
                    **settings,
                )
                if config.key not in seen:  # overriding steps can make two entries coincide
                    seen.add(config.key)
                    configs.append(config)
    return configs
