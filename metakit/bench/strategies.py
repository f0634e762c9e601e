"""The one table of benchmarked strategies, and the learner each (workload, strategy, S) runs.

Every list of strategies in ``benchmarks/`` (the default grid, the priming workload's, the size
sweep's, the command line's names, the plots' labels, markers and colours, the hand-written loop and
the fidelity reference) is derived from `STRATEGIES`. Adding a strategy is one new entry.

Example:
    >>> from metakit.bench.strategies import entry
    >>> entry("second-order").label, entry("second-order").exact
    ('SecondOrder', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torchopt

import metakit as mk
from metakit.bench.workloads import BuiltWorkload

__all__ = [
    "EXACT_REFERENCE",
    "STRATEGIES",
    "StrategyEntry",
    "build_executor",
    "build_learner",
    "build_strategy",
    "canonical_strategy",
    "entry",
    "names",
    "strategy_label",
    "unsupported_reason",
    "workload_learner",
]


@dataclass(frozen=True)
class StrategyEntry:
    """One benchmarked strategy.

    Attributes:
        name: the command-line name (``second-order``).
        code: a metakit expression building the strategy, e.g. ``'SecondOrder(hvp="forward")'``. It is
            evaluated only when the entry is run, so an entry may name an option that this metakit
            does not have yet: that configuration is recorded as ``"unsupported"``.
        label: the name in tables and plots (default: ``code`` without a trailing ``()``).
        exact: computes SecondOrder()'s meta-gradient (by another route). Its hand-written loop is the
            second-order one and its fidelity is measured against SecondOrder().
        first_order: the hand-written loop reproduces it with constant inner gradients (FOMAML).
        proximal: an implicit (iMAML) gradient; its fidelity reference is the exact gradient of the
            proximal inner problem solved to convergence (`metakit.bench.reference`), not MAML's.
        core: measured on every workload (priming included) and up to the largest S: the exact
            modes and FirstOrder, whose memory against S is the point of the comparison.
        sweep: measured across model sizes (the size sweep).
        executor: a metakit expression building the learner's executor (``None``: ``Sequential()``),
            e.g. ``"executors.Vmap()"``: the same gradient, computed over the tasks in one batch.
        default: in the default comparison of a workload (``False``: only where a grid names it).
        precision: the learner's ``precision=`` (``"bf16"``: its cosine to the float32 gradient).
    """

    name: str
    code: str
    label: str = ""
    exact: bool = False
    first_order: bool = False
    proximal: bool = False
    core: bool = False
    sweep: bool = False
    executor: str | None = None
    default: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.code.removesuffix("()"))

    @property
    def hand_written(self) -> str | None:
        """Which hand-written loop reproduces this gradient: ``"second-order"``, ``"first-order"`` or None."""
        if self.exact:
            return "second-order"
        return "first-order" if self.first_order else None


STRATEGIES: tuple[StrategyEntry, ...] = (
    StrategyEntry("second-order", "SecondOrder()", exact=True, core=True, sweep=True),
    StrategyEntry(
        "second-order-forward",
        'SecondOrder(hvp="forward")',
        label="SecondOrder(hvp=forward)",
        exact=True,
        core=True,
    ),
    StrategyEntry("second-order-checkpoint-4", "SecondOrder(checkpoint=4)", exact=True, core=True),
    StrategyEntry(
        "second-order-forward-checkpoint-4",
        'SecondOrder(hvp="forward", checkpoint=4)',
        label="SecondOrder(hvp=forward, checkpoint=4)",
        exact=True,
        core=True,
    ),
    # One step per segment: each step recomputed alone, reverse over reverse (the activation-heavy case).
    StrategyEntry("second-order-checkpoint-1", "SecondOrder(checkpoint=1)", exact=True, default=False),
    StrategyEntry("first-order", "FirstOrder()", first_order=True, core=True, sweep=True),
    StrategyEntry("truncated-1", "Truncated(1)"),
    StrategyEntry("reptile", "Reptile()"),
    StrategyEntry("implicit", "Implicit()", proximal=True),  # metakit's defaults, whatever they become
    # The inner problem solved to the tolerance: where the implicit gradient is meant to hold.
    StrategyEntry(
        "implicit-solved",
        "Implicit(lam=10.0, cg_steps=20, max_inner_steps=300, residual_tol=0.01)",
        label="Implicit(λ=10, solved)",
        proximal=True,
        default=False,
    ),
    StrategyEntry(
        "second-order-vmap",
        "SecondOrder()",
        label="SecondOrder [Vmap]",
        exact=True,
        executor="executors.Vmap()",
        default=False,
    ),
    StrategyEntry(
        "first-order-vmap",
        "FirstOrder()",
        label="FirstOrder [Vmap]",
        first_order=True,
        executor="executors.Vmap()",
        default=False,
    ),
    StrategyEntry(
        "second-order-bf16",
        "SecondOrder()",
        label="SecondOrder [bf16]",
        precision="bf16",
        default=False,
    ),
)

#: The strategy whose meta-gradient every other is compared with (MAML's exact gradient).
EXACT_REFERENCE = "second-order"

_BY_NAME = {e.name: e for e in STRATEGIES}


def names(**flags: bool) -> tuple[str, ...]:
    """Names of the entries in table order; ``names(core=True)`` keeps those whose ``core`` is True.

    Raises:
        AttributeError: a flag that `StrategyEntry` does not have.
    """
    return tuple(
        e.name for e in STRATEGIES if all(getattr(e, flag) == value for flag, value in flags.items())
    )


def entry(name: str) -> StrategyEntry:
    """The table entry for a canonical name; an unknown name (an old record's) gets a plain entry."""
    return _BY_NAME.get(name) or StrategyEntry(name, name, label=name)


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


_ALIASES: dict[str, str] = {}
for _entry in STRATEGIES:  # the first entry keeps a shared spelling ("SecondOrder()" of the Vmap row)
    for _spelling in (_entry.name, _entry.label, _entry.code):
        _ALIASES.setdefault(_key(_spelling), _entry.name)


def canonical_strategy(text: str) -> str:
    """Map ``SecondOrder``, ``second_order``, ``Truncated(1)``… to the canonical ``second-order`` form.

    Raises:
        ValueError: the name is not a known strategy (the message lists the valid names).
    """
    name = _ALIASES.get(_key(text))
    if name is None:
        raise ValueError(f"unknown strategy {text!r}; valid strategies: {', '.join(names())}")
    return name


def strategy_label(name: str) -> str:
    """The table label of a canonical strategy name (``second-order`` -> ``SecondOrder``)."""
    return entry(name).label


def _evaluate(code: str):
    scope = {"__builtins__": {}, **{n: getattr(mk, n) for n in mk.__all__}}
    return eval(code, scope)  # the code comes from the table above, never from input


def build_strategy(name: str) -> mk.Strategy:
    """Evaluate the entry's ``code`` with metakit's public names in scope (and nothing else).

    Raises:
        TypeError, ValueError: this metakit does not accept the entry's options.
    """
    return _evaluate(entry(name).code)


def build_executor(name: str):
    """The entry's executor (``None`` for the learner's default, ``Sequential()``)."""
    code = entry(name).executor
    return None if code is None else _evaluate(code)


def unsupported_reason(name: str) -> str | None:
    """Why this metakit cannot build the entry's strategy (``None`` when it can)."""
    try:
        build_strategy(name)
        build_executor(name)
    except (TypeError, ValueError, AttributeError) as error:
        return f"{entry(name).code} is not available in this metakit: {error}"
    return None


def build_learner(built: BuiltWorkload, strategy: str, steps: int) -> mk.MetaLearner:
    """The metakit learner for a workload and a table entry's strategy (see `workload_learner`).

    Raises:
        TypeError, ValueError: the strategy or the combination is not supported.
    """
    reason = unsupported_reason(strategy)
    if reason is not None:
        raise ValueError(reason)
    return workload_learner(
        built,
        build_strategy(strategy),
        steps,
        executor=build_executor(strategy),
        precision=entry(strategy).precision,
    )


def workload_learner(
    built: BuiltWorkload, strategy: mk.Strategy, steps: int, *, executor=None, precision: str = "fp32"
) -> mk.MetaLearner:
    """The learner for a workload with a given strategy: plain MAML-style, or ``recipes.priming``."""
    if built.priming:
        from metakit import recipes

        return recipes.priming(
            built.model,
            built.loss_fn,
            pe=built.pe,
            head=built.head,
            inner_lr=built.inner_lr,
            steps=steps,
            strategy=strategy,
            executor=executor,
            precision=precision,
        )
    return mk.MetaLearner(
        built.model,
        built.loss_fn,
        inner=mk.InnerLoop(params=built.inner, optimizer=torchopt.sgd(lr=built.inner_lr), steps=steps),
        outer_params=built.outer,
        strategy=strategy,
        executor=executor,
        precision=precision,
    )
