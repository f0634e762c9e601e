"""Capabilities, declared once: what each strategy and executor needs and supports.

Every strategy and executor has a ``capabilities`` attribute, a `Capabilities`. The learner
refuses a combination of parts through `check_composition`, `metakit.check` reports the
same findings, and the compatibility table in ``docs/strategies.md`` is generated from them
(`metakit.compatibility`); no class asks another's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from metakit.buffers import BUFFER_POLICIES

__all__ = [
    "Capabilities",
    "CompositionError",
    "check_composition",
    "composition_problems",
    "needs",
]


class CompositionError(ValueError):
    """A combination of metakit's parts that cannot compute the exact meta-gradient, refused up front."""


@dataclass(frozen=True)
class Capabilities:
    """What a strategy or an executor needs of the model and supports of the other parts.

    Attributes:
        double_backward: differentiates through inner gradients by reverse over reverse (every
            operation in the support loss needs a double backward).
        forward_mode: forms Hessian-vector products by forward over reverse (every operation needs a
            forward-mode rule).
        recomputes_steps: runs inner steps again in the backward pass.
        functional: (strategy) has a ``torch.func`` form, so ``Vmap`` can run it; (executor) runs
            strategies in that form (differentiated steps are then reverse over reverse).
        learned_lr: MetaSGD scales (``InnerLoop(learn_lr=True)``) get a meta-gradient.
        outer_only: outer parameters that the inner loop does not adapt get a meta-gradient.
        loss_scaling: float16's static loss scaling (``precision="fp16"``) is applied.
        cut: a feature-reuse cut is used.
        buffers: the buffer policies supported.
        in_place_buffers: (executor) can write the module's own buffers during a meta-step
            (``InnerLoop(buffers="update")`` on a model with BatchNorm statistics).
        autocast_batch_norm: (executor) runs BatchNorm layers under autocast (``torch.func.vmap``'s
            batch_norm rule does not follow autocast's casts).
    """

    double_backward: bool = False
    forward_mode: bool = False
    recomputes_steps: bool = False
    functional: bool = True
    learned_lr: bool = True
    outer_only: bool = True
    loss_scaling: bool = True
    cut: bool = True
    buffers: frozenset[str] = frozenset(BUFFER_POLICIES)
    in_place_buffers: bool = True
    autocast_batch_norm: bool = True


def needs(strategy: Any, executor: Any) -> Capabilities:
    """What the model must support when ``executor`` runs ``strategy`` (under ``vmap`` every
    differentiated step is reverse over reverse)."""
    own, runs = strategy.capabilities, executor.capabilities
    if runs.functional and (own.double_backward or own.forward_mode):
        return Capabilities(double_backward=True)
    return own


def composition_problems(
    strategy: Any,
    executor: Any,
    *,
    model: nn.Module | None = None,
    buffers: str = "update",
    learn_lr: bool = False,
    outer_only: Sequence[str] = (),
    cut: bool = False,
    precision: str = "fp32",
) -> list[tuple[str, str]]:
    """Every reason the combination cannot be exact, as ``(what was asked, what works instead)``."""
    s, e = strategy.capabilities, executor.capabilities
    problems = []
    if e.functional and not s.functional:
        problems.append(
            (
                f"{executor!r} batches tasks with torch.func.vmap, but {strategy!r} has no torch.func form "
                "(it runs its own autograd.Function)",
                "executors.Sequential() or executors.Distributed(local=executors.Sequential())",
            )
        )
    for part, caps in (("strategy", strategy), ("executor", executor)):
        if buffers not in caps.capabilities.buffers:
            problems.append(
                (
                    f"InnerLoop(buffers={buffers!r}) with the {part} {caps!r}",
                    f"InnerLoop(buffers=...) one of {sorted(caps.capabilities.buffers)}",
                )
            )
    if buffers == "update" and not e.in_place_buffers and model is not None and _writes_statistics(model):
        problems.append(
            (
                f"InnerLoop(buffers='update') with {executor!r}, which cannot write the module's "
                "BatchNorm statistics in place while it batches the tasks",
                "InnerLoop(buffers='task') (the same meta-gradient; the module's statistics stay as they are), "
                "InnerLoop(buffers='frozen'), or executors.Sequential()",
            )
        )
    if precision != "fp32" and not e.autocast_batch_norm and model is not None and _has_batch_norm(model):
        problems.append(
            (
                f"precision={precision!r} with {executor!r} on a model with BatchNorm layers "
                "(torch.func.vmap's batch_norm rule does not follow autocast's casts)",
                "precision='fp32' with this executor, or executors.Sequential() in low precision",
            )
        )
    if learn_lr and not s.learned_lr:
        problems.append(
            (
                f"InnerLoop(learn_lr=True) with {strategy!r}, which does not differentiate through the "
                "inner steps, so the learned rates get no meta-gradient",
                "SecondOrder() or Truncated(k)",
            )
        )
    if learn_lr and not e.learned_lr:
        problems.append((f"InnerLoop(learn_lr=True) with {executor!r}", "executors.Sequential()"))
    if outer_only and not s.outer_only:
        problems.append(
            (
                f"{strategy!r} needs every outer parameter to be adapted in the inner loop (outer ⊆ inner), "
                f"but {len(outer_only)} are outer only, e.g. {list(outer_only)[:3]}",
                "add them to the inner spec, remove them from outer_params, or use FirstOrder()/SecondOrder()",
            )
        )
    if cut and not (s.cut and e.cut):
        problems.append((f"a feature-reuse cut with {strategy!r} on {executor!r}", "cut=None"))
    if precision == "fp16" and not (s.loss_scaling and e.loss_scaling):
        problems.append(
            (
                f"precision='fp16' (static loss scaling) with {strategy!r} on {executor!r}, which does not "
                "scale its gradients",
                "precision='bf16' (no loss scaling needed), or SecondOrder(), FirstOrder(), Truncated(k), "
                "Reptile() on executors.Sequential()",
            )
        )
    return problems


def check_composition(strategy: Any, executor: Any, **settings: Any) -> None:
    """Raise `CompositionError` naming each part of the combination that cannot be exact."""
    problems = composition_problems(strategy, executor, **settings)
    if problems:
        details = "; ".join(f"{asked}. Instead: {instead}" for asked, instead in problems)
        raise CompositionError(
            f"metakit cannot compute the exact meta-gradient of this combination: {details}."
        )


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _NormBase) for m in model.modules())


def _writes_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, _NormBase) and m.track_running_stats for m in model.modules())
