"""Recipes: named configurations of the same parts. Each returns a :class:`MetaLearner`, nothing more.

Example:
    >>> from metakit import recipes
    >>> learner = recipes.priming(model, loss_fn, pe=adapter, head=head)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torchopt
from torch import nn
from torchopt.base import GradientTransformation

from metakit.executors import Executor
from metakit.inner import InnerLoop
from metakit.learner import MetaLearner
from metakit.reuse import Cut
from metakit.spec import Spec, everything
from metakit.strategies import FirstOrder, Implicit, Reptile, SecondOrder, Strategy
from metakit.task import LossFn

__all__ = [
    "anil",
    "fomaml",
    "imaml",
    "maml",
    "maml_loop_priming",
    "meta_adapters",
    "priming",
    "reptile",
    "tams",
]


def _inner(
    spec: Spec, inner_lr: float, steps: int, optimizer: GradientTransformation | None, **kw
) -> InnerLoop:
    return InnerLoop(spec, optimizer if optimizer is not None else torchopt.sgd(lr=inner_lr), steps, **kw)


def maml(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    inner_lr: float = 0.01,
    steps: int = 1,
    params: Spec | None = None,
    strategy: Strategy | None = None,
    optimizer: GradientTransformation | None = None,
    learn_lr: bool = False,
    logger: Any = None,
    executor: Executor | None = None,
    precision: str = "fp32",
) -> MetaLearner:
    """MAML (Finn et al., 2017): every parameter (or ``params``) adapts and is meta-learned, exactly.

    ``learn_lr=True`` gives Meta-SGD (learned per-element inner rates).
    """
    spec = params if params is not None else everything()
    return MetaLearner(
        model,
        loss_fn,
        inner=_inner(spec, inner_lr, steps, optimizer, learn_lr=learn_lr),
        outer_params=spec,
        strategy=strategy if strategy is not None else SecondOrder(),
        logger=logger,
        executor=executor,
        precision=precision,
    )


def fomaml(model: nn.Module, loss_fn: LossFn, **kwargs: Any) -> MetaLearner:
    """First-order MAML: :func:`maml` with :class:`FirstOrder` meta-gradients."""
    return maml(model, loss_fn, strategy=FirstOrder(), **kwargs)


def reptile(model: nn.Module, loss_fn: LossFn, **kwargs: Any) -> MetaLearner:
    """Reptile (Nichol et al., 2018): :func:`maml`'s partition, meta-gradient ``θ − φ``."""
    return maml(model, loss_fn, strategy=Reptile(), **kwargs)


def imaml(
    model: nn.Module, loss_fn: LossFn, *, lam: float = 1.0, cg_steps: int = 10, **kwargs: Any
) -> MetaLearner:
    """iMAML (Rajeswaran et al., 2019): :func:`maml`'s partition with the implicit meta-gradient."""
    return maml(model, loss_fn, strategy=Implicit(lam=lam, cg_steps=cg_steps), **kwargs)


def anil(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    head: Spec,
    inner_lr: float = 0.01,
    steps: int = 1,
    strategy: Strategy | None = None,
    optimizer: GradientTransformation | None = None,
    logger: Any = None,
    executor: Executor | None = None,
    precision: str = "fp32",
) -> MetaLearner:
    """ANIL (Raghu et al., 2020): only the head adapts; everything is meta-learned."""
    return MetaLearner(
        model,
        loss_fn,
        inner=_inner(head, inner_lr, steps, optimizer),
        outer_params=everything(),
        strategy=strategy if strategy is not None else SecondOrder(),
        logger=logger,
        cut="auto",
        executor=executor,
        precision=precision,
    )


def priming(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    pe: Spec,
    head: Spec,
    backbone: Spec | None = None,
    inner_lr: float = 0.03,
    steps: int = 5,
    strategy: Strategy | None = None,
    optimizer: GradientTransformation | None = None,
    logger: Any = None,
    adapt_backbone: bool = False,
    executor: Executor | None = None,
    cut: Cut | str | None = "auto",
    precision: str = "fp32",
) -> MetaLearner:
    """Meta-learning for parameter-efficient fine-tuning (Gheini et al., Algorithm 1).

    Inner loop: the PE parameters θa and the head θh; outer: the backbone θp and θa; θh is carried
    over from the first task of each meta-batch. First-order by default, as in the paper.

    Args:
        pe: the parameter-efficient parameters (e.g. from ``metakit.peft.add_top_adapter``).
        head: the task head.
        backbone: the pretrained parameters to prime; default everything else.
        adapt_backbone: the inner loop also updates the backbone (the paper's ablation 6, see
            :func:`maml_loop_priming`).
        cut: feature reuse (:class:`~metakit.Cut`): ``"auto"`` finds it for the Hugging Face layouts
            metakit knows, so the encoder runs once per batch; ``None`` runs the whole model at every
            inner step. The meta-gradient is the same.
    """
    backbone = backbone if backbone is not None else everything() - pe - head
    inner = backbone | pe | head if adapt_backbone else pe | head
    return MetaLearner(
        model,
        loss_fn,
        inner=_inner(inner, inner_lr, steps, optimizer),
        outer_params=backbone | pe,
        strategy=strategy if strategy is not None else FirstOrder(),
        inner_only="first_task",
        logger=logger,
        cut=cut if not adapt_backbone else None,
        executor=executor,
        precision=precision,
    )


def maml_loop_priming(model: nn.Module, loss_fn: LossFn | None, **kwargs: Any) -> MetaLearner:
    """The priming paper's ablation 6: :func:`priming` whose inner loop also updates the backbone."""
    return priming(model, loss_fn, adapt_backbone=True, **kwargs)


def meta_adapters(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    adapters: Spec,
    head: Spec,
    inner_lr: float = 0.03,
    steps: int = 5,
    strategy: Strategy | None = None,
    optimizer: GradientTransformation | None = None,
    logger: Any = None,
    executor: Executor | None = None,
    precision: str = "fp32",
) -> MetaLearner:
    """Meta-Adapters (Bansal et al., 2022): inner = adapters + head, outer = adapters, backbone frozen.

    The head is not meta-learned: every task adapts it from the same starting value.
    """
    return MetaLearner(
        model,
        loss_fn,
        inner=_inner(adapters | head, inner_lr, steps, optimizer),
        outer_params=adapters,
        strategy=strategy if strategy is not None else SecondOrder(),
        inner_only="keep",
        logger=logger,
        cut="auto",
        executor=executor,
        precision=precision,
    )


def tams(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    controller: Any,
    head: Spec,
    backbone: Spec | None = None,
    meta_learn_init: bool = True,
    inner_lr: float = 0.03,
    steps: int = 5,
    strategy: Strategy | None = None,
    optimizer: GradientTransformation | None = None,
    logger: Any = None,
) -> MetaLearner:
    """TARP + TAMS (Hou et al., 2022, "Meta-Learning the Difference"): structure and weights meta-learned.

    Inner loop: the candidates' task-adaptive parameters (TARP's task factors, the adapters) and the
    head. Outer: the architecture weights ``α`` and TARP's shared factors and generator (outer only),
    the task-adaptive parameters' initialisation (``meta_learn_init``, MAML-style), and ``backbone`` if
    given (to meta-learn the pretrained weights too; default frozen). The head adapts from the same
    start in every task. First-order by default (cheap); ``strategy=SecondOrder()`` is exact.

    Args:
        controller: the :class:`metakit.peft.TamsController` from ``metakit.peft.add_tams``.
        head: the task head (e.g. ``metakit.peft.head_spec(model)``).

    Example:
        >>> tams = metakit.peft.add_tams(model, rank=4)  # doctest: +SKIP
        >>> learner = recipes.tams(model, loss_fn, controller=tams, head=head_spec(model))  # doctest: +SKIP
    """
    inner = controller.inner | head
    outer = controller.outer
    if meta_learn_init:
        outer = outer | controller.inner
    if backbone is not None:
        outer = outer | backbone
    return MetaLearner(
        model,
        loss_fn,
        inner=_inner(inner, inner_lr, steps, optimizer),
        outer_params=outer,
        strategy=strategy if strategy is not None else FirstOrder(),
        inner_only="keep",
        logger=logger,
    )
