"""Strategy names used on the command line, and the learner each (workload, strategy, S) runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torchopt

import metakit as mk
from benchmarks.workloads import BuiltWorkload

__all__ = ["STRATEGIES", "build_learner", "canonical_strategy"]

#: Command-line name -> (label used in tables, factory). Truncated(1) and Implicit use the issue's settings.
STRATEGIES: dict[str, tuple[str, Callable[[], mk.Strategy]]] = {
    "second-order": ("SecondOrder", mk.SecondOrder),
    "first-order": ("FirstOrder", mk.FirstOrder),
    "truncated-1": ("Truncated(1)", lambda: mk.Truncated(1)),
    "reptile": ("Reptile", mk.Reptile),
    "implicit": ("Implicit", lambda: mk.Implicit(lam=1.0, cg_steps=10)),
}


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


_ALIASES = {_key(name): name for name in STRATEGIES} | {
    _key(label): name for name, (label, _) in STRATEGIES.items()
}


def canonical_strategy(text: str) -> str:
    """Map ``SecondOrder``, ``second_order``, ``Truncated(1)``… to the canonical ``second-order`` form.

    Raises:
        ValueError: the name is not a known strategy (the message lists the valid names).
    """
    name = _ALIASES.get(_key(text))
    if name is None:
        raise ValueError(f"unknown strategy {text!r}; valid strategies: {', '.join(STRATEGIES)}")
    return name


def strategy_label(name: str) -> str:
    """The table label of a canonical strategy name (``second-order`` -> ``SecondOrder``)."""
    return STRATEGIES[name][0]


def build_learner(built: BuiltWorkload, strategy: str, steps: int) -> mk.MetaLearner:
    """The metakit learner for a workload: plain MAML-style, or ``recipes.priming`` for priming."""
    factory = STRATEGIES[strategy][1]
    if built.priming:
        from metakit import recipes

        return recipes.priming(
            built.model,
            built.loss_fn,
            pe=built.pe,
            head=built.head,
            inner_lr=built.inner_lr,
            steps=steps,
            strategy=factory(),
        )
    return mk.MetaLearner(
        built.model,
        built.loss_fn,
        inner=mk.InnerLoop(params=built.inner, optimizer=torchopt.sgd(lr=built.inner_lr), steps=steps),
        outer_params=built.outer,
        strategy=factory(),
    )


def parse_names(texts: Iterable[str], canonical: Callable[[str], str]) -> list[str]:
    """Split comma-separated names, canonicalise each, drop duplicates, keep order."""
    names: list[str] = []
    for text in texts:
        for part in text.split(","):
            if part.strip():
                name = canonical(part.strip())
                if name not in names:
                    names.append(name)
    return names
